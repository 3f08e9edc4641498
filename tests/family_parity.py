"""Parity helpers for the families diffusers loads (Wan, Qwen-Image): the weights diffusers' own loader gives for a
LoRA file on a pipeline holding one tiny transformer, and the check that lora_compat's weights equal them."""
from __future__ import annotations

import copy
from pathlib import Path

import torch


def fused_by_diffusers(pipeline_class: type, model: torch.nn.Module, path: Path, strength: float = 1.0
                       ) -> dict[str, torch.Tensor]:
    """``load_lora_weights`` + ``fuse_lora`` on a ``pipeline_class`` holding a copy of ``model`` as its transformer
    (every other required component ``None``): ``{"transformer.<param>": fused value}``."""
    import inspect

    fused = copy.deepcopy(model)
    others = [name for name, p in inspect.signature(pipeline_class.__init__).parameters.items()
              if name not in ("self", "transformer") and p.default is inspect.Parameter.empty]
    pipe = pipeline_class(transformer=fused, **dict.fromkeys(others))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return {f"transformer.{k}": v.detach() for k, v in fused.state_dict().items()}


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: torch.nn.Module,
                   component: str = "transformer") -> None:
    """``got`` holds every parameter ``expected`` changes from ``model`` 's, and only those, each within fp32 relative
    error 1e-5 of the change."""
    base = {f"{component}.{k}": v for k, v in model.state_dict().items()}
    changed = sorted(k for k in expected if not torch.equal(expected[k], base[k]))
    assert changed and sorted(got) == changed  # every trained weight, and only those
    for name in changed:
        err = (got[name] - expected[name]).norm() / (expected[name] - base[name]).norm()
        assert err < 1e-5, (name, float(err))


def peft_lora_file(pipeline_class: type, model: torch.nn.Module, path: Path, targets: list[str], rank: int,
                   alpha: float, seed: int = 1) -> Path:
    """A LoRA on ``targets`` written by peft + ``pipeline_class.save_lora_weights`` (scales in
    ``lora_adapter_metadata``), its factors seeded random values."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    trained = copy.deepcopy(model)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    trained.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = get_peft_model_state_dict(trained)
    pipeline_class.save_lora_weights(str(path.parent), transformer_lora_layers=state,
                                     transformer_lora_adapter_metadata=config.to_dict(), weight_name=path.name)
    return path


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
