"""The tiny SD1.5 model under each host's own layout, and the expected values (``lora_compat.patched_weights``)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import lora_compat
from lora_compat.archs.sd import sgm_aliases

STRENGTH = 0.7
SD_FILES = [("lycoris", v) for v in (
    "lora", "lora_tucker", "loha", "loha_tucker", "lokr", "lokr_full", "lokr_decompose_both", "lokr_tucker", "ia3",
    "glora", "diag_oft", "boft", "full", "norm", "dora_out", "dora_in", "loha_dora", "lokr_dora")] + \
    [("peft", v) for v in ("diffusers", "diffusers_dora", "diffusers_legacy", "kohya_from_diffusers")]
VARIANTS = [v for _, v in SD_FILES]


def tree(leaves: dict[str, nn.Module], root: nn.Module | None = None) -> nn.Module:
    """``root`` (a new ``nn.Module`` by default) whose submodule at each dotted name is the given (shared, not
    copied) leaf module."""
    root = nn.Module() if root is None else root
    for name, leaf in leaves.items():
        parent = root
        *parts, last = name.split(".")
        for part in parts:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        parent.add_module(last, leaf)
    return root


def sgm_unet(unet: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """The diffusers UNet's own modules under their SGM (compvis) names, as ComfyUI, Forge and A1111 hold them
    (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``...); and SGM name → diffusers path."""
    aliases = {sgm: path for sgm, path in sgm_aliases(dict(unet.named_modules())).items()
               if any(True for _ in unet.get_submodule(path).parameters(recurse=False))}
    return tree({sgm: unet.get_submodule(path) for sgm, path in aliases.items()}), aliases


def comfy_unet_config(unet: nn.Module) -> dict:
    """ComfyUI's ``unet_config`` (``num_res_blocks``, ``transformer_depth``...) of a diffusers SD UNet."""
    config = unet.config
    layers = config.layers_per_block
    down = [int("CrossAttn" in t) for t in config.down_block_types for _ in range(layers)]
    up = [int("CrossAttn" in t) for t in config.up_block_types for _ in range(layers + 1)]
    return {"num_res_blocks": [layers] * len(config.block_out_channels),
            "channel_mult": [c // config.block_out_channels[0] for c in config.block_out_channels],
            "transformer_depth": down, "transformer_depth_output": list(reversed(up)),
            "transformer_depth_middle": 1, "context_dim": config.cross_attention_dim}


def parameters_by_name(components: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``<component>.<parameter>`` → a copy of its current value."""
    return {f"{c}.{n}": p.detach().clone() for c, m in components.items() for n, p in m.named_parameters()}


def expected(path: Path, components: dict[str, nn.Module], strength: float = STRENGTH) -> dict[str, torch.Tensor]:
    """``patched_weights`` in fp32, keyed ``<component>.<parameter>``."""
    return {k: v.float() for k, v in lora_compat.patched_weights(path, components, strength).items()}


def set_values(components: dict[str, nn.Module], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, value in values.items():
            component, _, name = key.partition(".")
            components[component].get_parameter(name).copy_(value)


def sequential(components: dict[str, nn.Module], paths: list[Path], strength: float = STRENGTH
               ) -> dict[str, torch.Tensor]:
    """lora_compat's answer for LoRAs applied one after the other, as every host chains them: each file's
    ``patched_weights`` computed on the weights the previous ones produced. Every parameter, fp32."""
    base = parameters_by_name(components)
    state = {k: v.float() for k, v in base.items()}
    try:
        for path in paths:
            set_values(components, state)
            state.update(expected(path, components, strength))
    finally:
        set_values(components, base)
    return state


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """The host's weight equals lora_compat's (fp32 relative error < 1e-5)."""
    error = float((got.float() - want).norm()) / max(float(want.norm()), 1e-12)
    assert error < 1e-5, f"{what}: relative error {error:.2e}"


def assert_state(components: dict[str, nn.Module], want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
                 ) -> None:
    """Every parameter lora_compat changes has its patched value; every other one is bit-identical to base."""
    now = parameters_by_name(components)
    for key, value in now.items():
        if key in want:
            assert_close(value, want[key], key)
        else:
            assert torch.equal(value, base[key]), f"{key} changed, but the LoRA does not touch it"


def assert_restored(components: dict[str, nn.Module], base: dict[str, torch.Tensor]) -> None:
    now = parameters_by_name(components)
    changed = [k for k, v in now.items() if not torch.equal(v, base[k])]
    assert not changed, f"not restored bit for bit: {changed[:5]}"


def text_model(text_encoder: nn.Module) -> nn.Module:
    """The CLIP text model a host holds as ``<prefix>.transformer.text_model`` (transformers 5's
    ``CLIPTextModel`` is that module itself; older versions wrap it as ``.text_model``)."""
    return getattr(text_encoder, "text_model", text_encoder)


def peft_tuner_expected(tmp_path: Path, sd15: dict[str, nn.Module], variant: str
                        ) -> tuple[Path, dict[str, torch.Tensor]]:
    """A PEFT tuner file (diffusers layout) and PEFT's own merge at STRENGTH: ``set_scale`` for LoHa/LoKr, and for
    OFT/BOFT/IA3, which PEFT cannot scale, lora_compat's documented ``W + s·(W_peft − W)``."""
    from lora_compat.oracles.peft_tuner_oracle import write_tuner_file

    if variant.startswith(("loha", "lokr")):
        return write_tuner_file(tmp_path, sd15, variant, "diffusers", seed=11, scale=STRENGTH)
    path, merged = write_tuner_file(tmp_path, sd15, variant, "diffusers", seed=11)
    base = parameters_by_name(sd15)
    return path, {k: base[k] + STRENGTH * (v - base[k]) for k, v in merged.items()}


def save_checkpoint(root: Path, components: dict[str, nn.Module]) -> Path:
    """The components as a diffusers folder (what ``convert --checkpoint`` takes)."""
    for name, module in components.items():
        module.save_pretrained(root / name)
    return root
