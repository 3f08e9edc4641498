"""Shared FLUX.1 test helpers: a tiny random ``FluxTransformer2DModel``, an independent BFL (fused) host built
from it, the BFL <-> diffusers table, and LoRA files in the diffusers, sd-scripts and BFL Control layouts.

The BFL host and the table are written here from dialects.md §5.1, independently of ``lora_compat.archs.flux``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def make_flux(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(dtype).eval()


# -- an independent BFL host: the diffusers weights fused by hand -------------------------------------------
def bfl_table(model: torch.nn.Module) -> dict[str, list[str]]:
    """BFL module → diffusers modules in row order (dialects.md §5.1)."""
    table = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"],
             "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
             "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
             "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
             "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
             "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
             "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
             "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"]}
    for i in range(len(model.transformer_blocks)):
        d, b = f"double_blocks.{i}", f"transformer_blocks.{i}"
        table.update({
            f"{d}.img_attn.qkv": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"],
            f"{d}.txt_attn.qkv": [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"],
            f"{d}.img_attn.proj": [f"{b}.attn.to_out.0"], f"{d}.txt_attn.proj": [f"{b}.attn.to_add_out"],
            f"{d}.img_mlp.0": [f"{b}.ff.net.0.proj"], f"{d}.img_mlp.2": [f"{b}.ff.net.2"],
            f"{d}.txt_mlp.0": [f"{b}.ff_context.net.0.proj"], f"{d}.txt_mlp.2": [f"{b}.ff_context.net.2"],
            f"{d}.img_mod.lin": [f"{b}.norm1.linear"], f"{d}.txt_mod.lin": [f"{b}.norm1_context.linear"],
            f"{d}.img_attn.norm.query_norm": [f"{b}.attn.norm_q"], f"{d}.img_attn.norm.key_norm": [f"{b}.attn.norm_k"],
            f"{d}.txt_attn.norm.query_norm": [f"{b}.attn.norm_added_q"],
            f"{d}.txt_attn.norm.key_norm": [f"{b}.attn.norm_added_k"],
        })
    for i in range(len(model.single_transformer_blocks)):
        s, b = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        table.update({
            f"{s}.linear1": [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"],
            f"{s}.linear2": [f"{b}.proj_out"], f"{s}.modulation.lin": [f"{b}.norm.linear"],
            f"{s}.norm.query_norm": [f"{b}.attn.norm_q"], f"{s}.norm.key_norm": [f"{b}.attn.norm_k"],
        })
    return table


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    return torch.cat([t[half:], t[:half]])


class BflNorm(torch.nn.Module):
    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = torch.nn.Parameter(scale.clone())


def make_bfl_host(model: torch.nn.Module) -> torch.nn.Module:
    """A module tree with BFL names whose fused weights are the diffusers weights concatenated by rows."""
    host = torch.nn.Module()
    for bfl, parts in bfl_table(model).items():
        subs = [model.get_submodule(p) for p in parts]
        if bfl.endswith(("query_norm", "key_norm")):
            leaf = BflNorm(subs[0].weight.detach())
        else:
            weight = torch.cat([m.weight.detach() for m in subs])
            bias = torch.cat([m.bias.detach() for m in subs])
            if bfl == "final_layer.adaLN_modulation.1":
                weight, bias = swap_halves(weight), swap_halves(bias)
            leaf = torch.nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
            with torch.no_grad():
                leaf.weight.copy_(weight)
                leaf.bias.copy_(bias)
        parent = host
        *path, name = bfl.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name, leaf)
    return host


def split_view(host: torch.nn.Module, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The host's weights cut back into diffusers parameter names."""
    out = {}
    for bfl, parts in bfl_table(model).items():
        leaf = host.get_submodule(bfl)
        if isinstance(leaf, BflNorm):
            out[f"{parts[0]}.weight"] = leaf.scale.detach()
            continue
        weight, bias = leaf.weight.detach(), leaf.bias.detach()
        if bfl == "final_layer.adaLN_modulation.1":
            weight, bias = swap_halves(weight), swap_halves(bias)
        row = 0
        for p in parts:
            rows = model.get_submodule(p).weight.shape[0]
            out[f"{p}.weight"], out[f"{p}.bias"] = weight[row:row + rows], bias[row:row + rows]
            row += rows
    return out


# -- files ------------------------------------------------------------------------------------------------------
def diffusers_file(path: Path, model: torch.nn.Module, modules: list[str], rank: int = 4, seed: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in modules:
        weight = model.get_submodule(name).weight
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, weight.shape[1], generator=g)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(weight.shape[0], rank, generator=g) * 0.1
    save_file(tensors, str(path))
    return path


def kohya_flux_file(path: Path, model: torch.nn.Module, rank: int = 4, seed: int = 2) -> Path:
    """Full-coverage sd-scripts Flux LoRA: BFL names, fused qkv/linear1, alpha != rank."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for bfl, parts in bfl_table(model).items():
        if bfl.endswith(("query_norm", "key_norm")):
            continue
        subs = [model.get_submodule(p).weight for p in parts]
        key = "lora_unet_" + bfl.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, subs[0].shape[1], generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(sum(w.shape[0] for w in subs), rank, generator=g) * 0.1
        tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    save_file(tensors, str(path))
    return path


def control_file(path: Path, model: torch.nn.Module, rank: int = 4, seed: int = 3) -> Path:
    """A BFL Control LoRA: lora_A/lora_B/lora_B.bias everywhere, norm scales, img_in widened 2x."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for bfl, parts in bfl_table(model).items():
        subs = [model.get_submodule(p) for p in parts]
        if bfl.endswith(("query_norm", "key_norm")):
            tensors[f"{bfl}.scale"] = torch.randn(subs[0].weight.shape, generator=g)
            continue
        rows = sum(m.weight.shape[0] for m in subs)
        width = subs[0].weight.shape[1] * (2 if bfl == "img_in" else 1)
        tensors[f"{bfl}.lora_A.weight"] = torch.randn(rank, width, generator=g)
        tensors[f"{bfl}.lora_B.weight"] = torch.randn(rows, rank, generator=g) * 0.1
        tensors[f"{bfl}.lora_B.bias"] = torch.randn(rows, generator=g) * 0.1
    save_file(tensors, str(path))
    return path


PARTIAL = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
           "transformer_blocks.1.attn.add_k_proj", "single_transformer_blocks.0.attn.to_q",
           "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_mlp",
           "norm_out.linear", "transformer_blocks.1.ff.net.2"]


def flux_forward(model: torch.nn.Module, channels: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 16, channels, generator=g),
                     encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                     pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                     guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3)).sample
