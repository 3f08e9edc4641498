"""Single-file SD checkpoints for the tests: the diffusers components' parameters under the SGM / LDM names a
``.safetensors`` checkpoint uses (``model.diffusion_model.input_blocks.1.1...``,
``cond_stage_model.transformer.text_model...``).

The SGM names come from ``lora_compat.archs.sd.sgm_aliases``; ``test_bake.py`` checks them against diffusers'
own single-file converter (``convert_ldm_unet_checkpoint``), so tests that read such a checkpoint back do not
rest on the package's table alone.
"""
from __future__ import annotations

import torch

from lora_compat.archs.sd import sgm_aliases


def single_file_names(components: dict[str, torch.nn.Module]) -> dict[str, str]:
    """``"<component>.<parameter>"`` → its name in a single-file checkpoint (UNet and CLIP text encoder)."""
    unet, te = components["unet"], components["text_encoder"]
    names = {}
    for sgm, path in sgm_aliases(dict(unet.named_modules())).items():
        for param, _ in unet.get_submodule(path).named_parameters(recurse=False):
            names[f"unet.{path}.{param}"] = f"model.diffusion_model.{sgm}.{param}"
    for key, _ in te.named_parameters():
        names[f"text_encoder.{key}"] = f"cond_stage_model.transformer.text_model.{key}"
    return names


def single_file_tensors(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The components' parameters under their single-file names, contiguous and detached."""
    params = {f"{c}.{n}": p.detach() for c, m in components.items() for n, p in m.named_parameters()}
    return {name: params[key].contiguous() for key, name in single_file_names(components).items()}
