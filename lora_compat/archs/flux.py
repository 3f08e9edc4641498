"""FLUX.1: the diffusers (split) transformer layout, the BFL (fused) layout, and the exact map between them.

Canonical targets are the diffusers names (``transformer_blocks.0.attn.to_q``). A BFL module such as
``double_blocks.0.img_attn.qkv`` is the row-wise concatenation of several canonical modules; every row
range is derived from the model's own shapes, never from a hard-coded width.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .base import Arch, ModuleIndex
from .names import HostNames, is_t5
from .routes import BlockLayout, FusedLayout, ParamShapes, Part, Route, stacked_parts

#: BFL module in ``double_blocks.N`` → the canonical modules in ``transformer_blocks.N``, in row order
DOUBLE_BLOCK = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.norm.query_norm": ("attn.norm_q",),
    "img_attn.norm.key_norm": ("attn.norm_k",),
    "txt_attn.norm.query_norm": ("attn.norm_added_q",),
    "txt_attn.norm.key_norm": ("attn.norm_added_k",),
}
#: BFL module in ``single_blocks.N`` → canonical modules in ``single_transformer_blocks.N``
SINGLE_BLOCK = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
    "norm.query_norm": ("attn.norm_q",),
    "norm.key_norm": ("attn.norm_k",),
}
TOP_LEVEL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
#: Chroma's approximator (``distilled_guidance_layer``): BFL name → diffusers name, where they differ; the
#: groups exist only where the model has the modules (a FLUX.1 model has none)
APPROXIMATOR = {"in_layer": "linear_1", "out_layer": "linear_2"}
_APPROXIMATOR = re.compile(r"^distilled_guidance_layer\.(?:(layers\.\d+)\.(linear_1|linear_2|in_layer|out_layer)"
                           r"|(norms\.\d+|in_proj|out_proj))$")
#: BFL chunks this modulation as (shift, scale), diffusers as (scale, shift): the output halves swap
SWAPPED = {"final_layer.adaLN_modulation.1"}
#: BFL RMSNorms call their parameter ``scale``; diffusers calls it ``weight``
NORM_SUFFIXES = ("query_norm", "key_norm")


@dataclass(frozen=True)
class BflNames:
    """A BFL-style family's fused layout: per-block and top-level BFL modules → their canonical parts (row
    order), and the modules whose output halves swap (FLUX.1 and FLUX.2 share the machinery, not the tables)."""

    double: Mapping[str, tuple[str, ...]]
    single: Mapping[str, tuple[str, ...]]
    top: Mapping[str, str]
    swapped: frozenset[str] = frozenset(SWAPPED)
    #: whether Chroma's approximator (``distilled_guidance_layer``) is named too: Chroma shares FLUX.1's layout
    approximator: bool = False


#: FLUX.1's, and Chroma's: the approximator groups exist only where the model has the modules
FLUX1_BFL = BflNames(DOUBLE_BLOCK, SINGLE_BLOCK, TOP_LEVEL, approximator=True)

_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.")
_BFL_DOUBLE = re.compile(r"^double_blocks\.(\d+)\.")
_BFL_SINGLE = re.compile(r"^single_blocks\.(\d+)\.")


def _blocks(paths: Iterable[str], pattern: re.Pattern) -> list[int]:
    return sorted({int(m.group(1)) for p in paths if (m := pattern.match(p))})


def is_flux_transformer(modules: Mapping[str, ParamShapes]) -> bool:
    """diffusers ``FluxTransformer2DModel`` module names (split layout)."""
    return "x_embedder" in modules and ("single_transformer_blocks.0.proj_mlp" in modules
                                        or "transformer_blocks.0.attn.add_q_proj" in modules) \
        and "double_stream_modulation_img.linear" not in modules  # FLUX.2's shared modulation


def is_bfl_transformer(modules: Mapping[str, ParamShapes]) -> bool:
    """BFL / ComfyUI Flux module names (fused layout)."""
    return "img_in" in modules and ("double_blocks.0.img_attn.qkv" in modules or "single_blocks.0.linear1" in modules) \
        and "double_stream_modulation_img.lin" not in modules  # FLUX.2's shared modulation


def bfl_groups(paths: Iterable[str], names: BflNames = FLUX1_BFL) -> dict[str, tuple[str, ...]]:
    """Every BFL module name of a diffusers-layout Flux transformer → its canonical modules (row order)."""
    paths = list(paths)
    groups: dict[str, tuple[str, ...]] = {}
    for i in _blocks(paths, _DOUBLE):
        for bfl, parts in names.double.items():
            groups[f"double_blocks.{i}.{bfl}"] = tuple(f"transformer_blocks.{i}.{p}" for p in parts)
    for i in _blocks(paths, _SINGLE):
        for bfl, parts in names.single.items():
            groups[f"single_blocks.{i}.{bfl}"] = tuple(f"single_transformer_blocks.{i}.{p}" for p in parts)
    for bfl, canonical in names.top.items():
        groups[bfl] = (canonical,)
    for path in paths if names.approximator else ():
        bfl = approximator_name(path, to_bfl=True)
        if bfl is not None:
            groups[bfl] = (path,)
    return groups


def approximator_name(path: str, to_bfl: bool) -> str | None:
    """A Chroma approximator module under the other layout's name (``layers.0.linear_1`` ↔ ``layers.0.in_layer``;
    ``in_proj``, ``out_proj`` and ``norms.N`` are named alike), or ``None`` for any other module."""
    m = _APPROXIMATOR.match(path)
    if m is None:
        return None
    if m.group(3) is not None:
        return path
    names = {v: k for k, v in APPROXIMATOR.items()} if to_bfl else APPROXIMATOR
    if m.group(2) not in names:
        return None
    return f"distilled_guidance_layer.{m.group(1)}.{names[m.group(2)]}"


def bfl_parts(modules: Mapping[str, ParamShapes], names: BflNames = FLUX1_BFL) -> dict[str, list[Part]]:
    """BFL module name → the canonical modules it fuses, with their row ranges (from the model's shapes).
    Only groups whose canonical modules all exist are listed."""
    return stacked_parts(modules, bfl_groups(modules, names), lambda bfl, rows: bfl in names.swapped)


def rows_from_file(modules: Mapping[str, ParamShapes], rows: Mapping[str, int], names: BflNames = FLUX1_BFL,
                   groups: Callable[[Iterable[str]], Mapping[str, tuple[str, ...]]] | None = None
                   ) -> dict[str, ParamShapes]:
    """``modules`` (a diffusers-layout Flux table) with the output rows a LoRA's own tensors imply: a module the
    LoRA patches takes its patch's rows; a part of a fused BFL module that the LoRA leaves out takes the rows of a
    patched sibling, scaled by the table's proportions (to_k as to_q; ``proj_mlp`` 4x ``to_q``). Input widths stay
    as the table has them: only the fused layout (names and row ranges) is derived from the result. Raises
    ``ValueError`` when the patched parts of one fused module imply different widths."""
    sized = {path: n for path, n in rows.items() if path in modules}
    for bfl, canonical in (groups(modules) if groups is not None else bfl_groups(modules, names)).items():
        known = [c for c in canonical if c in sized]
        if len(canonical) < 2 or not known or not all(c in modules for c in canonical):
            continue
        first = known[0]
        odd = [k for k in known if sized[k] * _rows(modules[first]) != sized[first] * _rows(modules[k])]
        if odd:
            raise ValueError(f"{bfl}: its parts imply different widths ({first}: {sized[first]} rows, {odd[0]}: "
                             f"{sized[odd[0]]} rows; the base has {_rows(modules[first])} and {_rows(modules[odd[0]])})")
        for c in canonical:
            if c in sized:
                continue
            ref = next((k for k in known if _rows(modules[k]) == _rows(modules[c])), known[0])
            scaled, rest = divmod(_rows(modules[c]) * sized[ref], _rows(modules[ref]))
            if not rest:
                sized[c] = scaled
    return {path: ({p: (sized[path], *s[1:]) if s else s for p, s in shapes.items()} if path in sized else shapes)
            for path, shapes in modules.items()}


def _rows(shapes: ParamShapes) -> int:
    shape = shapes.get("weight") or next(iter(shapes.values()))
    return shape[0]


def canonical_from_bfl(host: Mapping[str, ParamShapes], names: BflNames = FLUX1_BFL
                       ) -> tuple[dict[str, ParamShapes], dict[str, Route]]:
    """For a BFL-layout host: the canonical (diffusers) module table it is equivalent to, and where each
    canonical module lives in the host. Row splits come from the host's shapes: ``qkv`` is three equal
    thirds; ``linear1`` is q, k, v of the width of ``linear2`` 's output, then the MLP rows."""
    table: dict[str, ParamShapes] = {}
    routes: dict[str, Route] = {}
    for path, shapes in host.items():
        canonical = _canonical_parts(path, host, names)
        if canonical is None:
            continue
        for target, start, stop in canonical:
            renamed = (("weight", "scale"),) if path.endswith(NORM_SUFFIXES) or ".norms." in path else ()
            lookup = dict(renamed)
            view: ParamShapes = {}
            for param in ("weight", "bias"):
                shape = shapes.get(lookup.get(param, param))
                if shape is not None:
                    view[param] = (stop - start, *shape[1:])
            table[target] = view
            routes[target] = Route(path, start, stop, path in names.swapped, renamed)
    return table, routes


def _canonical_parts(path: str, host: Mapping[str, ParamShapes], bfl: BflNames
                     ) -> list[tuple[str, int, int]] | None:
    shapes = host[path]
    rows = _rows(shapes)
    if path in bfl.top:
        return [(bfl.top[path], 0, rows)]
    if bfl.approximator:
        approximator = approximator_name(path, to_bfl=False)
        if approximator is not None:
            return [(approximator, 0, rows)]
    for pattern, table, prefix in ((_BFL_DOUBLE, bfl.double, "transformer_blocks"),
                                   (_BFL_SINGLE, bfl.single, "single_transformer_blocks")):
        m = pattern.match(path)
        if not m:
            continue
        rest = path[m.end():]
        parts = table.get(rest)
        if parts is None:
            return None
        names = [f"{prefix}.{m.group(1)}.{p}" for p in parts]
        if len(names) == 1:
            return [(names[0], 0, rows)]
        if rest == "linear1":
            width = _rows(host.get(f"single_blocks.{m.group(1)}.linear2", {}) or {"weight": (rows // 7,)})
            sizes = [width, width, width, rows - 3 * width]
        else:
            sizes = [rows // len(names)] * len(names)
        bounds, row = [], 0
        for name, size in zip(names, sizes):
            bounds.append((name, row, row + size))
            row += size
        return bounds
    return None


_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks|single_blocks|double_blocks)\.(\d+)\.")
#: a transformer module's block when the host uses BFL names (ComfyUI-style)
_BFL_IN = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in")


def lbw_block(component: str, path: str, index: ModuleIndex) -> str | None:
    """LoRA Block Weight block (its Flux vector): ``CLIP``, ``T5``, ``IN`` (the input embedders), ``D00``-``D18``,
    ``S00``-``S37``, ``OUT`` (the final layer)."""
    modules = index.components.get(component, {})
    if component.startswith("text_encoder"):
        return "T5" if is_t5(modules) else "CLIP"
    if not is_flux_transformer(modules):
        return None
    if m := _BLOCK.match(path):
        return f"{'S' if m.group(1).startswith('single') else 'D'}{int(m.group(2)):02}"
    if path.startswith(("x_embedder", "context_embedder", "time_text_embed", "distilled_guidance_layer", *_BFL_IN)):
        return "IN"
    if path.startswith(("norm_out", "proj_out", "final_layer")):
        return "OUT"
    return None


FLUX_KOHYA_PREFIXES = {"lora_unet_": "transformer", "lora_transformer_": "transformer",
                       "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                       "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_2"}


def _flux_hint(metadata: Mapping[str, str]) -> bool:
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    return version.startswith("flux1") or arch.startswith("flux-1")


FLUX1 = Arch(
    id="flux1", title="FLUX.1 (dev/schnell family)", table_file="flux1.json.gz",
    kohya_prefixes=FLUX_KOHYA_PREFIXES, metadata_hint=_flux_hint,
    component_classes={"transformer": ("FluxTransformer2DModel",), "text_encoder": ("CLIPTextModel",),
                       "text_encoder_2": ("T5EncoderModel",)},
    fused_layout=FusedLayout(is_flux_transformer, is_bfl_transformer, bfl_parts, canonical_from_bfl,
                             rows_from_file),
    # the transformer under its BFL names (its fused layout), CLIP-L under lora_te_, T5 under lora_te3_
    host_names={"transformer": HostNames("lora_unet_"), "text_encoder": HostNames("lora_te_", encoder="clip"),
                "text_encoder_2": HostNames("lora_te3_", encoder="t5")},
    # single files: the transformer under model.diffusion_model. or bare (found by its fused layout)
    checkpoint_prefixes={"model.diffusion_model.": "transformer"}, comfy_classes=("Flux", "FluxClipModel"),
    catalog_names=("flux.1 d", "flux.1 s", "flux.1 krea", "flux.1 kontext"),
    comfy_text_encoders={"text_encoder": "text_encoders.clip_l.transformer.",
                         "text_encoder_2": "text_encoders.t5xxl.transformer."},
    blocks=BlockLayout("flux", lbw_block),
)

#: FLUX.1-dev's published configs (transformer, CLIP-L, T5-XXL v1.1 encoder)
FLUX1_CONFIGS = {
    "transformer": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "text_encoder": ("CLIPTextModel", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")),
    "text_encoder_2": ("T5EncoderModel", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                              num_heads=64, relative_attention_num_buckets=32,
                                              feed_forward_proj="gated-gelu", is_encoder_decoder=False)),
}
