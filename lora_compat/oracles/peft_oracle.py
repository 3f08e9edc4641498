"""Write real diffusers / PEFT / kohya-converted LoRA files with the real libraries, plus PEFT's own merge.

`write_peft_file` attaches a PEFT LoRA adapter to deep copies of tiny components (see `models`), gives every
adapter parameter seeded random non-zero values, writes the file exactly the way the libraries' own save paths do,
and returns the merged weights that PEFT itself computes (`LoraLayer.merge` / `PeftModel.merge_and_unload`).

Variants (all produced with diffusers 0.42.1 / peft 0.21.2 / transformers 5.23):

- ``diffusers``: ``<Pipeline>.save_lora_weights`` with ``get_peft_model_state_dict`` per component and the
  ``*_lora_adapter_metadata`` arguments (``LoraConfig.to_dict()``, as ``diffusers.training_utils._collate_lora_metadata``
  builds it).  r=4, lora_alpha=8, plus rank_pattern / alpha_pattern entries.
- ``diffusers_rslora`` / ``diffusers_dora`` / ``diffusers_lora_bias``: the same with use_rslora / use_dora / lora_bias.
  lora_bias only targets layers that have a bias (PEFT cannot merge a LoRA bias into a bias-less layer, so the UNet's
  to_q/to_k/to_v are left out of that variant).
- ``diffusers_no_metadata``: saved without adapter metadata; built with alpha == r everywhere (scale 1).
- ``peft_raw`` / ``peft_raw_rslora`` / ``peft_raw_dora``: ``get_peft_model(unet)`` + ``save_pretrained`` -> the
  returned path is ``adapter_model.safetensors`` next to ``adapter_config.json``; UNet only.
- ``kohya_from_diffusers``: the diffusers training-script recipe: save the diffusers file (no metadata), reload it,
  ``convert_all_state_dict_to_peft`` -> ``convert_state_dict_to_kohya`` -> ``safetensors.torch.save_file``
  (the intermediate file stays in ``<variant>/diffusers/``).  The converter writes ``.alpha`` = rank, so the adapter
  is built with alpha == r.
- ``diffusers_legacy``: the layout of the pre-PEFT diffusers training scripts: ``convert_state_dict_to_diffusers`` of
  each PEFT state dict, then ``save_lora_weights`` (no metadata, scale 1, alpha == r).  Only attention layers are
  targeted, as those scripts did: the converter renames only to_q/to_k/to_v/to_out.0 (-> ``lora.down``/``lora.up``)
  and q/k/v/out_proj (-> ``lora_linear_layer.down``/``up``); any other layer would keep its PEFT ``lora_A``/``lora_B``
  name and give a mixed layout.

Not produced: kohya-converted DoRA.  ``convert_state_dict_to_kohya`` renames ``lora_magnitude_vector`` to
``dora_scale`` only for keys without a unet/text_encoder prefix, and its dot-to-underscore rule (keep the last two dots)
mangles the one-dot-shorter magnitude keys (``lora_unet_..._attn1.to_q.lora_magnitude_vector``); no real tool writes
that.  Kohya/legacy variants with rsLoRA / DoRA / LoRA bias are left out for the same reason: their converters have no
representation for them.

Keys of the returned ``expected`` are ``"<component>.<name in component.state_dict()>"``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import require
from .models import one_thread

require("peft", "diffusers", "transformers")

if TYPE_CHECKING:
    from peft import LoraConfig

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj")
UNET_BIASED_TARGETS = tuple(t for t in UNET_TARGETS if t not in ("to_q", "to_k", "to_v"))
UNET_ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TE_ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

RANK = 4
ALPHA = 8
# PEFT pattern keys are regexes matched against the end of the module name, after a "." boundary.
UNET_RANK_PATTERN = {"to_k": 2, "mid_block.resnets.0.conv1": 6}
UNET_ALPHA_PATTERN = {"to_k": 3, "proj_out": 2}
TE_RANK_PATTERN = {"fc1": 2}
TE_ALPHA_PATTERN = {"encoder.layers.1.self_attn.q_proj": 1}


@dataclass(frozen=True)
class _Spec:
    """How one variant builds its adapter and writes its file."""

    layout: str  # "diffusers" | "peft" | "kohya" | "legacy"
    scale_one: bool = False  # alpha == r per module (files that carry no alpha other than the rank)
    patterns: bool = True
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False
    metadata: bool = True
    unet_targets: tuple[str, ...] = UNET_TARGETS
    te_targets: tuple[str, ...] = TE_TARGETS


_SPECS: dict[str, _Spec] = {
    "diffusers": _Spec("diffusers"),
    "diffusers_rslora": _Spec("diffusers", use_rslora=True),
    "diffusers_dora": _Spec("diffusers", patterns=False, use_dora=True),
    "diffusers_lora_bias": _Spec("diffusers", patterns=False, lora_bias=True, unet_targets=UNET_BIASED_TARGETS),
    "diffusers_no_metadata": _Spec("diffusers", scale_one=True, metadata=False),
    "peft_raw": _Spec("peft", patterns=False),
    "peft_raw_rslora": _Spec("peft", use_rslora=True),
    "peft_raw_dora": _Spec("peft", patterns=False, use_dora=True),
    "kohya_from_diffusers": _Spec("kohya", scale_one=True, metadata=False),
    "diffusers_legacy": _Spec("legacy", scale_one=True, metadata=False,
                              unet_targets=UNET_ATTN_TARGETS, te_targets=TE_ATTN_TARGETS),
}
VARIANTS: tuple[str, ...] = tuple(_SPECS)


def _lora_config(spec: _Spec, component: str) -> LoraConfig:
    """The LoraConfig of one component; scale-one variants mirror rank_pattern into alpha_pattern."""
    from peft import LoraConfig

    is_unet = component == "unet"
    targets = spec.unet_targets if is_unet else spec.te_targets

    def pattern(entries: dict[str, int]) -> dict[str, int]:
        return {k: v for k, v in entries.items() if spec.patterns and k.rsplit(".", 1)[-1] in targets}

    rank_pattern = pattern(UNET_RANK_PATTERN if is_unet else TE_RANK_PATTERN)
    if spec.scale_one:
        alpha, alpha_pattern = RANK, dict(rank_pattern)
    else:
        alpha, alpha_pattern = ALPHA, pattern(UNET_ALPHA_PATTERN if is_unet else TE_ALPHA_PATTERN)
    return LoraConfig(
        r=RANK, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        target_modules=list(targets), init_lora_weights=True,
        use_rslora=spec.use_rslora, use_dora=spec.use_dora, lora_bias=spec.lora_bias,
    )


def _randomize_adapter(model: nn.Module, gen: torch.Generator) -> None:
    """Seeded non-zero values for lora_A / lora_B (+ LoRA bias) and a perturbed DoRA magnitude."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
            elif "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name.endswith(".bias") else 0.3))


def _changed(component: str, original: nn.Module, merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Entries of `merged` (original parameter names) that differ from `original`, keyed "<component>.<name>"."""
    before = original.state_dict()
    return {f"{component}.{k}": v.detach().float().clone() for k, v in merged.items()
            if not torch.equal(v.float(), before[k].float())}


def _set_scale(model: nn.Module, scale: float) -> None:
    """PEFT's own strength: `LoraLayer.set_scale` (scaling = scale * alpha / r) on every adapted layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if scale == 1.0:
        return
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for adapter in list(getattr(module, "scaling", {})):
                module.set_scale(adapter, scale)


def _merge_in_place(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's `LoraLayer.merge()` on every adapted layer; the base layers' parameters under their original names."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            for pname, p in module.get_base_layer().named_parameters(recurse=False):
                merged[f"{name}.{pname}"] = p
    return merged


def _adapted_copy(module: nn.Module, config: LoraConfig, gen: torch.Generator) -> nn.Module:
    """fp32 deep copy of `module` with the adapter injected (diffusers / transformers `add_adapter`) and randomized."""
    model = copy.deepcopy(module).float()
    model.add_adapter(config)
    _randomize_adapter(model, gen)
    return model


def _metadata(config: LoraConfig) -> dict:
    """`LoraConfig.to_dict()` as diffusers' training scripts pass it; target_modules sorted for a stable header."""
    meta = config.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return meta


def _pipeline_class(components: dict[str, nn.Module]) -> type:
    """StableDiffusionXLPipeline when there is a second text encoder, else StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if "text_encoder_2" in components else StableDiffusionPipeline


def _write_pipeline_file(out: Path, components: dict[str, nn.Module], spec: _Spec, gen: torch.Generator,
                         scale: float = 1.0) -> tuple[Path, dict[str, torch.Tensor]]:
    """diffusers / legacy / kohya layouts: one adapter per component, saved through `save_lora_weights`."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    kwargs, expected = {}, {}
    for name, module in components.items():
        config = _lora_config(spec, name)
        model = _adapted_copy(module, config, gen)
        layers = get_peft_model_state_dict(model)
        if spec.layout == "legacy":
            layers = convert_state_dict_to_diffusers(layers)
        kwargs[f"{name}_lora_layers"] = {k: v.detach().clone() for k, v in layers.items()}
        if spec.metadata:
            kwargs[f"{name}_lora_adapter_metadata"] = _metadata(config)
        _set_scale(model, scale)
        expected.update(_changed(name, module, _merge_in_place(model)))
    save_dir = out / "diffusers" if spec.layout == "kohya" else out
    _pipeline_class(components).save_lora_weights(save_dir, **kwargs)
    path = save_dir / "pytorch_lora_weights.safetensors"
    if spec.layout == "kohya":
        path = _convert_to_kohya(path, out / "kohya_lora.safetensors")
    return path, expected


def _convert_to_kohya(src: Path, dst: Path) -> Path:
    """The diffusers training scripts' kohya export of a saved diffusers LoRA file."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    save_file(convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(src))), dst)
    return dst


def _write_peft_raw(out: Path, unet: nn.Module, spec: _Spec, gen: torch.Generator, scale: float = 1.0
                    ) -> tuple[Path, dict[str, torch.Tensor]]:
    """`get_peft_model(unet).save_pretrained(out)`; expected from `merge_and_unload()`."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(unet).float(), _lora_config(spec, "unet"))
    _randomize_adapter(model, gen)
    model.save_pretrained(out)
    _set_scale(model, scale)
    merged = model.merge_and_unload().state_dict()
    return out / "adapter_model.safetensors", _changed("unet", unet, merged)


def write_peft_file(tmp_dir: Path, components: dict[str, nn.Module], variant: str, seed: int = 0,
                    scale: float = 1.0) -> tuple[Path, dict[str, torch.Tensor]]:
    """Attach a PEFT LoRA adapter to (deep copies of) the components, give lora_A/lora_B (and magnitude / lora bias
    where used) random non-zero seeded values, write the file in the variant's format, and return (path, expected)
    where expected maps "<component>.<parameter name in component.state_dict()>" to the fp32 value PEFT's own
    merge gives (merge_and_unload / layer.merge / fuse_lora), for every parameter the adapter changes, at PEFT's
    strength `scale` (`set_scale` before merging; the file does not depend on it).
    `components` must be left unmodified."""
    if variant not in _SPECS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    spec = _SPECS[variant]
    out = Path(tmp_dir) / variant
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    with one_thread():
        if spec.layout == "peft":
            return _write_peft_raw(out, components["unet"], spec, gen, scale)
        return _write_pipeline_file(out, components, spec, gen, scale)

