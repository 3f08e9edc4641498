"""Write real PEFT LoHa / LoKr / OFT / BOFT / IA³ adapter files with peft itself, plus PEFT's own merge.

`write_tuner_file` attaches a PEFT tuner to deep copies of tiny components (see `models`), gives every adapter
parameter seeded random values, writes the file the way the libraries' own save paths do, and returns the merged
weights PEFT computes (`layer.merge()` on every tuner layer, i.e. what `merge_and_unload` keeps).

Layouts:

- ``peft``: `get_peft_model(unet).save_pretrained(out)` -> ``adapter_model.safetensors`` (keys
  ``base_model.model.<module>.<parameter>``) beside ``adapter_config.json``; UNet only.
- ``diffusers``: `<component>.add_adapter(<Tuner>Config)` on the UNet (or FLUX.1 transformer) and the text
  encoder(s) given, then `StableDiffusion(XL)Pipeline` / `FluxPipeline.save_lora_weights` with
  `get_peft_model_state_dict` per component and the configs as ``*_lora_adapter_metadata`` (keys
  ``unet.<module>.<parameter>`` / ``text_encoder.<...>``).

BOFT with more than one butterfly factor needs peft's CUDA block-diagonal kernel (``fbd_cuda``; without it peft
forces one factor). For those variants `get_fbd_cuda` is replaced by a CPU stand-in that computes the same block
diagonal (`torch.block_diag` of each stage); peft's permutations, Cayley transform and merge run unchanged.
Single-factor BOFT gets ``None`` (peft's own fallback) without trying to compile the extension.

Keys of the returned ``expected`` are ``"<component>.<name in component.state_dict()>"``.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from torch import nn

from . import require
from .models import one_thread

require("peft", "diffusers", "transformers")

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
                "time_emb_proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
#: the diffusers layout's components, each with its targets (a FLUX.1 transformer: attention, MLP, output)
COMPONENT_TARGETS = {"unet": UNET_TARGETS, "transformer": ("to_q", "to_k", "to_v", "proj_mlp", "proj_out"),
                     "text_encoder": TE_TARGETS, "text_encoder_2": TE_TARGETS}


@dataclass(frozen=True)
class Variant:
    config: str  # the peft config class
    kwargs: dict[str, Any] = field(default_factory=dict)
    butterfly: bool = False  # BOFT with the CPU stand-in of the fbd_cuda kernel


VARIANTS: dict[str, Variant] = {
    "loha": Variant("LoHaConfig", dict(r=4, alpha=8, rank_pattern={"to_k": 2, "conv1": 3},
                                       alpha_pattern={"to_k": 5, "proj_out": 2})),
    "loha_effective_conv": Variant("LoHaConfig", dict(r=2, alpha=3, use_effective_conv2d=True)),
    "lokr": Variant("LoKrConfig", dict(r=4, alpha=8, rank_pattern={"to_k": 1, "conv1": 1, "fc1": 1},
                                       alpha_pattern={"to_k": 3})),
    "lokr_decompose_both": Variant("LoKrConfig", dict(r=1, alpha=2, decompose_both=True,
                                                      use_effective_conv2d=True)),
    "oft": Variant("OFTConfig", dict(r=0, oft_block_size=4)),
    "oft_cayley": Variant("OFTConfig", dict(r=0, oft_block_size=4, use_cayley_neumann=False)),
    "oft_coft_shared": Variant("OFTConfig", dict(r=0, oft_block_size=4, coft=True, eps=0.5, block_share=True,
                                                 num_cayley_neumann_terms=3)),
    "boft": Variant("BOFTConfig", dict(boft_block_size=4)),
    "ia3": Variant("IA3Config", dict(feedforward_modules=["ff.net.2", "conv2", "fc2"])),
    "boft_butterfly": Variant("BOFTConfig", dict(boft_block_num=0, boft_block_size=2, boft_n_butterfly_factor=2),
                              butterfly=True),
}


@contextmanager
def boft_kernel(stand_in: bool) -> Iterator[None]:
    """peft's ``get_fbd_cuda`` replaced by a CPU block-diagonal stand-in (``stand_in``) or by ``None``."""
    from peft.tuners.boft import layer

    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*stage) for stage in blocks])]

    kernel = SimpleNamespace(forward=forward) if stand_in else None
    original = layer.get_fbd_cuda
    layer.get_fbd_cuda = lambda: kernel
    try:
        yield
    finally:
        layer.get_fbd_cuda = original


def randomize_adapter(model: nn.Module, gen: torch.Generator) -> None:
    """Seeded values for every adapter parameter (BOFT's ``boft_s`` around 1)."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not p.requires_grad:
                continue
            if "boft_s" in name or "ia3_l" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def peft_merged(component: str, original: nn.Module, model: nn.Module, scale: float) -> dict[str, torch.Tensor]:
    """`layer.merge()` on every tuner layer (after PEFT's `set_scale(adapter, scale)`: LoHa/LoKr scaling
    ``scale · alpha / r``); the parameters that changed, under their original names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    before = original.state_dict()
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            if scale != 1.0:
                module.set_scale("default", scale)
            module.merge()
            for pname, p in module.get_base_layer().named_parameters(recurse=False):
                key = f"{name}.{pname}".removeprefix("base_model.model.")
                if not torch.equal(p.float(), before[key].float()):
                    out[f"{component}.{key}"] = p.detach().float().clone()
    return out


def _config(variant: Variant, targets: tuple[str, ...]):
    """The config for one component's targets (IA3's ``feedforward_modules`` must be among them)."""
    import peft

    kwargs = dict(variant.kwargs)
    if "feedforward_modules" in kwargs:
        kwargs["feedforward_modules"] = [m for m in kwargs["feedforward_modules"] if m in targets]
    return getattr(peft, variant.config)(target_modules=list(targets), **kwargs)


def write_tuner_file(tmp_dir: Path, components: dict[str, nn.Module], name: str, layout: str = "peft",
                     seed: int = 0, scale: float = 1.0) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write variant ``name`` (see VARIANTS) in ``layout`` (``peft`` or ``diffusers``); returns (path, expected).
    ``scale``: PEFT's own strength (``set_scale``) for the merge; LoHa/LoKr only (PEFT has none for OFT/BOFT/IA3).
    ``components`` (``unet``; for the diffusers layout any of COMPONENT_TARGETS) are left unmodified."""
    import peft
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    variant = VARIANTS[name]
    if scale != 1.0 and variant.config not in ("LoHaConfig", "LoKrConfig"):
        raise ValueError(f"PEFT has no strength for {variant.config[:-6]}: set_scale keeps 1")
    out = Path(tmp_dir) / f"{name}_{layout}"
    gen = torch.Generator().manual_seed(seed)
    with one_thread(), boft_kernel(variant.butterfly):
        if layout == "peft":
            model = peft.get_peft_model(copy.deepcopy(components["unet"]).float(), _config(variant, UNET_TARGETS))
            randomize_adapter(model, gen)
            model.save_pretrained(out)
            return out / "adapter_model.safetensors", peft_merged("unet", components["unet"], model, scale)
        kwargs, expected = {}, {}
        for component in (c for c in COMPONENT_TARGETS if c in components):
            targets = COMPONENT_TARGETS[component]
            config = _config(variant, targets)
            model = copy.deepcopy(components[component]).float()
            model.add_adapter(config)
            randomize_adapter(model, gen)
            kwargs[f"{component}_lora_layers"] = {k: v.detach().clone()
                                                  for k, v in peft.get_peft_model_state_dict(model).items()}
            meta = config.to_dict()
            meta["target_modules"] = sorted(meta["target_modules"])
            kwargs[f"{component}_lora_adapter_metadata"] = meta
            expected.update(peft_merged(component, components[component], model, scale))
        pipeline = FluxPipeline if "transformer" in components else \
            StableDiffusionXLPipeline if "text_encoder_2" in components else StableDiffusionPipeline
        pipeline.save_lora_weights(out, **kwargs)
        return out / "pytorch_lora_weights.safetensors", expected
