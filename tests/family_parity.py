"""Parity helpers shared by the family tests (Wan, FLUX.2, Qwen-Image): LoRA files written by peft + a pipeline's
``save_lora_weights``, the weights diffusers' own loader fuses, and the comparison against them."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import torch


def peft_lora_file(model: torch.nn.Module, path: Path, pipeline: type, targets: Sequence[str], rank: int,
                   alpha: float, seed: int = 1) -> Path:
    """A random LoRA on ``targets`` written by peft + ``pipeline.save_lora_weights`` (scales in
    ``lora_adapter_metadata``)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    pipeline.save_lora_weights(str(path.parent), transformer_lora_layers=trained_lora(model, config, seed),
                               transformer_lora_adapter_metadata=config.to_dict(), weight_name=path.name)
    return path


def trained_lora(model: torch.nn.Module, config, seed: int) -> dict[str, torch.Tensor]:
    """The PEFT state dict of ``config`` added to a copy of ``model``, its LoRA factors drawn at random."""
    from peft.utils import get_peft_model_state_dict

    trained = copy.deepcopy(model)
    trained.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return get_peft_model_state_dict(trained)


def diffusers_fused(model: torch.nn.Module, path: Path, pipeline: Callable[[torch.nn.Module], object],
                    strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The weights diffusers gives: ``load_lora_weights`` + ``fuse_lora`` on ``pipeline(copy of model)``."""
    fused = copy.deepcopy(model)
    pipe = pipeline(fused)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return {f"transformer.{k}": v.detach() for k, v in fused.state_dict().items()}


def fused_by_diffusers(pipeline_class: type, model: torch.nn.Module, path: Path, strength: float = 1.0
                       ) -> dict[str, torch.Tensor]:
    """:func:`diffusers_fused` on a ``pipeline_class`` holding ``model`` as its transformer and ``None`` for every
    other required component."""
    import inspect

    others = [name for name, p in inspect.signature(pipeline_class.__init__).parameters.items()
              if name not in ("self", "transformer") and p.default is inspect.Parameter.empty]
    return diffusers_fused(model, path, lambda t: pipeline_class(transformer=t, **dict.fromkeys(others)), strength)


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: torch.nn.Module,
                   unchanged_ok: bool = False, component: str = "transformer") -> None:
    """``got`` holds every weight ``expected`` changes, each within 1e-5 relative error of the change, and only
    those (``unchanged_ok``: also weights equal to the model's, e.g. a BFL qkv's zero k rows)."""
    base = {f"{component}.{k}": v for k, v in model.state_dict().items()}
    changed = sorted(k for k in expected if not torch.equal(expected[k], base[k]))
    if unchanged_ok:
        assert changed and set(changed) <= set(got)
        assert all(torch.equal(got[k], base[k]) for k in set(got) - set(changed))
    else:
        assert sorted(got) == changed  # every trained weight, and only those
    for name in changed:
        err = (got[name] - expected[name]).norm() / (expected[name] - base[name]).norm()
        assert err < 1e-5, (name, float(err))


def assert_patcher_matches(model: torch.nn.Module, path: Path, strength: float,
                           expected: dict[str, torch.Tensor]) -> None:
    """The Patcher on a copy of the bare transformer (its component from the family's class names) sets exactly
    ``expected``, and restores every weight bit for bit."""
    import lora_compat

    live = copy.deepcopy(model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    patcher = lora_compat.Patcher(live)
    patcher.set([(path, strength)])
    assert_matches({f"transformer.{k}": v for k, v in live.state_dict().items()
                    if not torch.equal(v, before[k])}, expected, model)
    patcher.set([])
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())
