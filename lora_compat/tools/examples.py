"""Built-in example files for ``lora-compat demo``: real layouts of several dialects, made from the
architecture tables (full-size names and shapes, tiny random ranks), plus files that must be refused."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..archs import SD15, SDXL

ATTENTION_LEAVES = (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")
TEXT_LEAVES = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")


def _targets(arch, component: str, leaves: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    modules = arch.index.components[component]
    return {path: shapes["weight"] for path, shapes in modules.items()
            if path.endswith(leaves) and "weight" in shapes and len(shapes["weight"]) in (2, 4)}


def _lora_pair(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    out, inner = shape[0], shape[1]
    kernel = shape[2:]
    down = torch.randn(rank, inner, *kernel, generator=gen).half() * 0.01
    up = torch.randn(out, rank, *([1] * len(kernel)), generator=gen).half() * 0.01
    return down, up


def kohya_sd15(path: Path, rank: int = 2) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for component, prefix, leaves in (("unet", "lora_unet_", ATTENTION_LEAVES),
                                      ("text_encoder", "lora_te_text_model_", TEXT_LEAVES)):
        for module, shape in _targets(SD15, component, leaves).items():
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = _lora_pair(shape, rank, gen)
            tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2).half()
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
                "ss_base_model_version": "sd_v1", "ss_output_name": "watercolor_style",
                "ss_tag_frequency": json.dumps({"10_watercolor": {"watercolor": 40, "painting": 12, "1girl": 3}})}
    save_file(tensors, str(path), metadata)
    return path


def loha_sdxl_sgm(path: Path, rank: int = 2) -> Path:
    """LyCORIS LoHa on SDXL's middle-block attention layers, under sd-scripts' SGM names."""
    gen = torch.Generator().manual_seed(1)
    modules = _targets(SDXL, "unet", ATTENTION_LEAVES)
    host = SDXL.index.host_names("unet").names(SDXL.index.components["unet"])  # lora_unet_<SGM name>
    tensors = {}
    for module, shape in modules.items():
        if not module.startswith("mid_block.") or len(shape) != 2:
            continue
        name = host[module].name
        for factor in ("1", "2"):
            tensors[f"{name}.hada_w{factor}_a"] = torch.randn(shape[0], rank, generator=gen).half() * 0.05
            tensors[f"{name}.hada_w{factor}_b"] = torch.randn(rank, shape[1], generator=gen).half() * 0.05
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(path), {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "loha"}',
                                   "modelspec.trigger_phrase": "ohwx dramatic lighting"})
    return path


def diffusers_sdxl(path: Path, rank: int = 4) -> Path:
    gen = torch.Generator().manual_seed(2)
    tensors = {}
    for component, leaves in (("unet", (".to_q", ".to_k", ".to_v", ".to_out.0")), ("text_encoder_2", TEXT_LEAVES)):
        for module, shape in _targets(SDXL, component, leaves).items():
            if component == "unet" and not module.startswith("down_blocks.1."):
                continue
            down, up = _lora_pair(shape, rank, gen)
            tensors[f"{component}.{module}.lora_A.weight"] = down
            tensors[f"{component}.{module}.lora_B.weight"] = up
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(
        {"unet.r": rank, "unet.lora_alpha": rank * 2, "text_encoder_2.r": rank, "text_encoder_2.lora_alpha": rank})}
    save_file(tensors, str(path), metadata)
    return path


def textual_inversion(path: Path) -> Path:
    save_file({"emb_params": torch.randn(4, 768).half()}, str(path))
    return path


def truncated(path: Path) -> Path:
    kohya_sd15(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


EXAMPLES = {
    "watercolor_kohya_sd15.safetensors": kohya_sd15,
    "lighting_loha_sdxl_sgm.safetensors": loha_sdxl_sgm,
    "detail_diffusers_sdxl.safetensors": diffusers_sdxl,
    "my_embedding.safetensors": textual_inversion,
    "half_downloaded.safetensors": truncated,
}


def write_examples(directory: Path) -> list[Path]:
    """Write every example into ``directory`` (each under a temporary name, renamed into place when complete;
    existing example files are replaced)."""
    from ..outputs import atomic_output

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in EXAMPLES.items():
        with atomic_output(directory / name) as temporary:
            make(temporary)
        paths.append(directory / name)
    return paths
