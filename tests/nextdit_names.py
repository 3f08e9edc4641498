"""Native (NextDiT / ComfyUI) names of diffusers' Z-Image and Lumina 2 Linear modules, written out by hand from
diffusers' single-file converters (``convert_z_image_transformer_checkpoint_to_diffusers``,
``convert_lumina2_to_diffusers``): the tests' own map, independent of lora_compat's."""
from __future__ import annotations

import re

_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)$")
#: diffusers → native, read off diffusers' single-file converters (convert_z_image_transformer_checkpoint_to_diffusers,
#: convert_lumina2_to_diffusers), written out by hand
Z_TOP = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
         "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"}
L_TOP = {"time_caption_embed.caption_embedder.1": "cap_embedder.1", "norm_out.linear_1": "final_layer.adaLN_modulation.1",
         "norm_out.linear_2": "final_layer.linear", "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
         "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2"}
L_BLOCK = {"attn.to_out.0": "attention.out", "feed_forward.linear_1": "feed_forward.w1",
           "feed_forward.linear_2": "feed_forward.w2", "feed_forward.linear_3": "feed_forward.w3",
           "norm1.linear": "adaLN_modulation.1"}


def native(base: str, path: str) -> str:
    """The native name of a diffusers Linear module (q/k/v: the fused ``attention.qkv``)."""
    top = Z_TOP if base == "z-image" else L_TOP
    if path in top:
        return top[path]
    m = _BLOCK.match(path)
    if m is None:
        return path
    rest = m.group(2)
    if rest.endswith(("to_q", "to_k", "to_v")):
        return f"{m.group(1)}.attention.qkv"
    if base == "z-image":
        return f"{m.group(1)}.{rest.replace('attention.to_out.0', 'attention.out')}"
    return f"{m.group(1)}.{L_BLOCK[rest]}"
