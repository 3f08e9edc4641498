"""Writes the corpus' derived full-coverage layouts of the newer families (lora_compat/corpus/derived_*.json.gz and
their INDEX.json entries): every Linear module of the family's full-size model, built on the ``meta`` device from
its diffusers class with the official config the family module uses (``generate_tables.build_components``), named
in the family's most common file layout by the tests' own name maps (diffusers' single-file converters read
backwards), nominal rank 16. Run ``python tests/derive_corpus.py`` from the checkout; it rewrites only its own
files and entries. Names and shapes only: no tensor data."""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_compat import corpus  # noqa: E402
from lora_compat.archs.generate_tables import build_components  # noqa: E402

RANK = 16
Names = dict[str, tuple[int, int]]  # module name in the file → (rows, columns)
LoraKeys = tuple[str, str, bool]  # down suffix, up suffix, alpha


def meta_linears(base: str) -> Names:
    """Every ``torch.nn.Linear`` of the family's transformer, built on ``meta`` at its official config."""
    model = build_components(base)["transformer"]
    return {p: tuple(m.weight.shape) for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def fused(linears: Names, groups: dict[str, tuple[str, ...]]) -> Names:
    """Native module → (rows of its stacked parts, columns); every Linear must be in exactly one group."""
    covered = sorted(p for parts in groups.values() for p in parts)
    assert covered == sorted(linears), set(covered) ^ set(linears)
    return {name: (sum(linears[p][0] for p in parts), linears[parts[0]][1]) for name, parts in groups.items()}


def _wan(linears: Names) -> Names:
    from test_wan_mapping import _native

    return {f"diffusion_model.{_native(p)}": s for p, s in linears.items()}


def _qwen_image(linears: Names) -> Names:
    return {"lora_unet_" + p.replace(".", "_"): s for p, s in linears.items()}


def _flux2(linears: Names) -> Names:
    from test_flux2_mapping import bfl_name

    groups: dict[str, tuple[str, ...]] = {}
    for path in linears:
        groups[bfl_name(path)] = groups.get(bfl_name(path), ()) + (path,)
    return {f"diffusion_model.{b}": s for b, s in fused(linears, groups).items()}


def _blocks(linears: Names, kinds: dict[str, tuple[str, dict[str, tuple[str, ...]]]],
            top: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Native groups of a BFL/MMDiT-style model: ``kinds`` maps a diffusers block list to (native block prefix,
    native module → the diffusers modules it stacks); groups whose parts a block lacks are left out."""
    groups = {native: (path,) for native, path in top.items()}
    for kind, (native_kind, table) in kinds.items():
        for block in sorted({int(p.split(".")[1]) for p in linears if p.startswith(kind + ".")}):
            for native, parts in table.items():
                paths = tuple(f"{kind}.{block}.{p}" for p in parts)
                if all(p in linears for p in paths):
                    groups[f"{native_kind}.{block}.{native}"] = paths
    return groups


def _chroma(linears: Names) -> Names:
    from test_chroma_mapping import DOUBLE, SINGLE, TOP

    groups = _blocks(linears, {"transformer_blocks": ("double_blocks", DOUBLE),
                               "single_transformer_blocks": ("single_blocks", SINGLE)}, TOP)
    return {"lora_unet_" + b.replace(".", "_"): s for b, s in fused(linears, groups).items()}


def _sd3(linears: Names) -> Names:
    from test_sd3_mapping import CONTEXT_BLOCK, TOP, X_BLOCK

    groups = {native: (path,) for native, path in TOP.items()}
    for block in sorted({int(p.split(".")[1]) for p in linears if p.startswith("transformer_blocks.")}):
        for stream, table in (("x_block", X_BLOCK), ("context_block", CONTEXT_BLOCK)):
            for native, parts in table.items():
                paths = tuple(f"transformer_blocks.{block}.{p}" for p in parts)
                if all(p in linears for p in paths):
                    groups[f"joint_blocks.{block}.{stream}.{native}"] = paths
    return {"lora_unet_" + b.replace(".", "_"): s for b, s in fused(linears, groups).items()}


KOHYA: LoraKeys = ("lora_down.weight", "lora_up.weight", True)
PEFT: LoraKeys = ("lora_A.weight", "lora_B.weight", False)


#: file → (base, corpus dialect label, name map, suffixes, origin, notes)
LAYOUTS: dict[str, tuple[str, str, Callable[[Names], Names], LoraKeys, str, list[str]]] = {
    "derived_wan_native_lora_full.json": (
        "wan", "native_lora", _wan, KOHYA,
        "DERIVED: full-coverage LoRA on every Linear module of WanTransformer3DModel (Wan 2.1 T2V-14B config plus "
        "I2V-14B's image cross-attention and image embedder, meta device) under its native (ComfyUI) names: "
        "diffusion_model.blocks.N.self_attn.q, lora_down/lora_up + alpha.",
        ["488 native modules = 488 diffusers Linear modules (one-to-one renames)"]),
    "derived_qwen_image_musubi_lora_full.json": (
        "qwen-image", "kohya_lora", _qwen_image, KOHYA,
        "DERIVED: full-coverage musubi-tuner / kohya LoRA on every Linear module of QwenImageTransformer2DModel "
        "(Qwen-Image 20B config, meta device): lora_unet_transformer_blocks_N_attn_to_q, lora_down/lora_up + alpha.",
        ["846 modules (Qwen-Image's diffusers names flattened with _)"]),
    "derived_flux2_dev_aitoolkit_lora_full.json": (
        "flux2", "aitoolkit_lora", _flux2, PEFT,
        "DERIVED: full-coverage ai-toolkit LoRA on every Linear module of Flux2Transformer2DModel (FLUX.2 dev config, "
        "meta device) under its BFL names: diffusion_model.double_blocks.N.img_attn.qkv, lora_A/lora_B, no alpha.",
        ["fused BFL modules (qkv, linear1 = q/k/v + SwiGLU mlp) stand for 203 diffusers Linear modules"]),
    "derived_chroma_kohya_lora_full.json": (
        "chroma", "kohya_lora", _chroma, KOHYA,
        "DERIVED: full-coverage sd-scripts LoRA on every Linear module of ChromaTransformer2DModel (Chroma1 config, "
        "meta device) under its BFL names, the approximator (distilled_guidance_layer) included: "
        "lora_unet_double_blocks_N_img_attn_qkv, lora_down/lora_up + alpha.",
        ["fused BFL modules (qkv, linear1) stand for 433 diffusers Linear modules"]),
    "derived_sd35_large_kohya_lora_full.json": (
        "sd3", "kohya_lora", _sd3, KOHYA,
        "DERIVED: full-coverage sd-scripts LoRA on every Linear module of SD3Transformer2DModel (SD3.5-Large config, "
        "meta device) under its MMDiT names: lora_unet_joint_blocks_N_x_block_attn_qkv (fused), "
        "lora_down/lora_up + alpha.",
        ["fused attn.qkv modules stand for 536 diffusers Linear modules"]),
}


def layout(name: str) -> dict:
    base, dialect, names, (down, up, alpha), origin, notes = LAYOUTS[name]
    linears = meta_linears(base)
    keys: dict[str, list[int]] = {}
    for module, (rows, columns) in sorted(names(linears).items()):
        keys[f"{module}.{down}"] = [RANK, columns]
        keys[f"{module}.{up}"] = [rows, RANK]
        if alpha:
            keys[f"{module}.alpha"] = []
    versions = {lib: importlib.metadata.version(lib) for lib in ("torch", "diffusers", "transformers")}
    return {"source": "derived with diffusers' class on the meta device (generate_tables.build_components) and the "
                      "tests' own native name maps (tests/derive_corpus.py)",
            "origin": origin, "provenance": "derived", "dialect": dialect, "base": base, "is_lora": True,
            "library_versions": versions, "notes": notes + [f"nominal rank {RANK}"],
            "num_keys": len(keys), "num_modules": len(linears), "keys": keys}


def main() -> None:
    folder = corpus.BUNDLED
    entries = [e for e in corpus.index(folder) if e["file"] not in LAYOUTS]
    for name in LAYOUTS:
        data = layout(name)
        with gzip.GzipFile(folder / f"{name}.gz", "wb", mtime=0) as f:  # mtime 0: reruns give the same bytes
            f.write(json.dumps(data, indent=None).encode())
        entries.append({"file": name} | {k: data[k] for k in ("dialect", "base", "provenance", "is_lora",
                                                               "num_keys", "origin")})
        print(f"{name}: {data['num_keys']} keys, {data['num_modules']} Linear modules")
    (folder / "INDEX.json").write_text(json.dumps(entries, indent=1))


if __name__ == "__main__":
    main()
