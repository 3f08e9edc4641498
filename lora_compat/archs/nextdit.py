"""Z-Image and Lumina-Image 2.0: diffusers' ``ZImageTransformer2DModel`` / ``Lumina2Transformer2DModel`` and the
native (NextDiT: Alpha-VLLM / Tongyi / ComfyUI) names of their modules.

Canonical targets are the diffusers names. The native layout fuses each block's q, k and v into one module
(``layers.N.attention.qkv``): three equal parts in Z-Image, uneven ones in Lumina 2 (grouped-query attention: k and v
have fewer heads). Every row range comes from the model's own ``to_q``/``to_k``/``to_v`` shapes (a native host: from
``attention.out``'s input width). The other modules are one-to-one renames. The maps are diffusers'
``_convert_non_diffusers_{z_image,lumina2}_lora_to_diffusers`` and single-file converters
(``convert_z_image_transformer_checkpoint_to_diffusers``, ``convert_lumina2_to_diffusers``) read backwards.
"""
from __future__ import annotations

import re
from typing import Mapping

from .base import Arch
from .names import HostNames
from .routes import FusedLayout, ModuleTable, ParamShapes, Part, Route

_BLOCK = re.compile(r"^((?:layers|noise_refiner|context_refiner)\.\d+)\.(.+)$")
_QKV = ("to_q", "to_k", "to_v")


class Naming:
    """One family's diffusers ↔ native names: ``attention`` is the diffusers attention module's name (Z-Image
    ``attention``, Lumina 2 ``attn``), ``block``/``top`` the one-to-one renames (diffusers → native)."""

    def __init__(self, attention: str, block: Mapping[str, str], top: Mapping[str, str], marker: str,
                 modulation: str):
        self.attention, self.block, self.top, self.marker = attention, dict(block), dict(top), marker
        self.modulation = modulation
        self.native_block = {v: k for k, v in self.block.items()}
        self.native_top = {v: k for k, v in self.top.items()}

    def is_split(self, modules: ModuleTable) -> bool:
        """The diffusers layout of this family (``marker``: a module only it has)."""
        return self.marker in modules and f"layers.0.{self.attention}.to_q" in modules

    def is_fused(self, modules: ModuleTable) -> bool:
        """The native layout of this family: fused ``qkv`` with this family's modulation (``modulation``: its native
        name in a block, ``adaLN_modulation.0`` in Z-Image, ``.1`` in Lumina 2)."""
        return "layers.0.attention.qkv" in modules and f"layers.0.{self.modulation}" in modules

    def native(self, path: str) -> str | None:
        """The native name of a diffusers module that is not a part of ``qkv``."""
        if path in self.top:
            return self.top[path]
        m = _BLOCK.match(path)
        if m is None:
            return None
        rest = m.group(2)
        if rest.startswith(f"{self.attention}."):
            leaf = rest[len(self.attention) + 1:]
            renamed = {"to_out.0": "out", "norm_q": "q_norm", "norm_k": "k_norm"}.get(leaf)
            return f"{m.group(1)}.attention.{renamed}" if renamed else None
        return f"{m.group(1)}.{self.block.get(rest, rest)}"

    def parts(self, modules: ModuleTable) -> dict[str, list[Part]]:
        """Every native module name → the diffusers modules it is, with row ranges from their shapes."""
        result: dict[str, list[Part]] = {}
        for path, shapes in modules.items():
            m = _BLOCK.match(path)
            if m and m.group(2) == f"{self.attention}.to_q":
                names = [f"{m.group(1)}.{self.attention}.{p}" for p in _QKV]
                if all(n in modules for n in names):
                    bounds, row = [], 0
                    for n in names:
                        rows = _rows(modules[n])
                        bounds.append(Part(n, row, row + rows))
                        row += rows
                    result[f"{m.group(1)}.attention.qkv"] = bounds
                continue
            if m and m.group(2) in (f"{self.attention}.{p}" for p in _QKV[1:]):
                continue
            native = self.native(path)
            if native is not None:
                result[native] = [Part(path, 0, _rows(shapes))]
        return result

    def canonical(self, host: ModuleTable) -> tuple[dict[str, ParamShapes], dict[str, Route]]:
        """A native host → the diffusers table it is equivalent to, and where each diffusers module lives in it.
        ``qkv``: q as wide as ``attention.out``'s input, k and v the rest in halves."""
        table: dict[str, ParamShapes] = {}
        routes: dict[str, Route] = {}
        for path, shapes in host.items():
            m = _BLOCK.match(path)
            if m and m.group(2) == "attention.qkv":
                rows = _rows(shapes)
                out = host.get(f"{m.group(1)}.attention.out", {}).get("weight")
                q = out[1] if out else rows // 3
                sizes = (q, (rows - q) // 2, (rows - q) // 2)
                start = 0
                for proj, size in zip(_QKV, sizes):
                    target = f"{m.group(1)}.{self.attention}.{proj}"
                    table[target] = {p: (size, *s[1:]) for p, s in shapes.items()}
                    routes[target] = Route(path, start, start + size)
                    start += size
                continue
            target = self._diffusers(path, host)
            if target is not None:
                table[target] = dict(shapes)
                routes[target] = Route(path, 0, _rows(shapes))
        return table, routes

    def _diffusers(self, native: str, host: ModuleTable) -> str | None:
        if native in self.native_top:
            return self.native_top[native]
        m = _BLOCK.match(native)
        if m is None:
            return None
        rest = m.group(2)
        leaf = {"attention.out": "to_out.0", "attention.q_norm": "norm_q", "attention.k_norm": "norm_k"}.get(rest)
        if leaf is not None:
            return f"{m.group(1)}.{self.attention}.{leaf}"
        if rest == "attention_norm1" and self.attention == "attn" and f"{m.group(1)}.adaLN_modulation.1" not in host:
            return f"{m.group(1)}.norm1"  # Lumina 2's context refiner: no modulation, a plain norm
        return f"{m.group(1)}.{self.native_block.get(rest, rest)}"

    def sized(self, modules: ModuleTable, rows: Mapping[str, int]) -> dict[str, ParamShapes]:
        """``modules`` with the output rows a LoRA's own tensors give (a file made for another width): a q, k or v
        the file leaves out takes the rows of a patched sibling as wide as it in the table (Lumina 2's k as v), else
        the patched one's scaled by the table's proportions."""
        sized = {path: n for path, n in rows.items() if path in modules}
        for parts in self.parts(modules).values():
            known = [p.target for p in parts if p.target in sized]
            for part in parts if known else ():
                if part.target in sized:
                    continue
                own = _rows(modules[part.target])
                ref = next((k for k in known if _rows(modules[k]) == own), known[0])
                scaled, rest = divmod(own * sized[ref], _rows(modules[ref]))
                if not rest:
                    sized[part.target] = scaled
        return {path: {p: (sized[path], *s[1:]) if s else s for p, s in shapes.items()} if path in sized else shapes
                for path, shapes in modules.items()}

    def layout(self) -> FusedLayout:
        return FusedLayout(self.is_split, self.is_fused, self.parts, self.canonical, self.sized)


def _rows(shapes: ParamShapes) -> int:
    shape = shapes.get("weight") or next(iter(shapes.values()))
    return shape[0]


#: Z-Image: the blocks keep their native names but for q/k/v, ``to_out.0`` and the q/k norms
Z_IMAGE_NAMES = Naming("attention", {}, {**{m: m for m in ("cap_embedder.0", "cap_embedder.1", "t_embedder.mlp.0",
                                                             "t_embedder.mlp.2")},
                                         "all_x_embedder.2-1": "x_embedder",
                                         "all_final_layer.2-1.linear": "final_layer.linear",
                                         "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"},
                       marker="all_x_embedder.2-1", modulation="adaLN_modulation.0")
#: Lumina 2: diffusers renamed the feed-forward, the modulation, the norms and the embedders
LUMINA2_NAMES = Naming(
    "attn",
    {"feed_forward.linear_1": "feed_forward.w1", "feed_forward.linear_2": "feed_forward.w2",
     "feed_forward.linear_3": "feed_forward.w3", "norm1.linear": "adaLN_modulation.1",
     "norm1.norm": "attention_norm1", "norm1": "attention_norm1", "norm2": "attention_norm2"},
    {"time_caption_embed.caption_embedder.0": "cap_embedder.0",
     "time_caption_embed.caption_embedder.1": "cap_embedder.1",
     "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
     "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
     "norm_out.linear_1": "final_layer.adaLN_modulation.1", "norm_out.linear_2": "final_layer.linear",
     "x_embedder": "x_embedder"},
    marker="time_caption_embed.caption_embedder.1", modulation="adaLN_modulation.1")
# the native block names map back one way: ``attention_norm1`` is ``norm1.norm`` (``norm1`` in the context refiner,
# which ``_diffusers`` tells apart by the missing modulation)
LUMINA2_NAMES.native_block["attention_norm1"] = "norm1.norm"

#: the first name part of every native NextDiT module, and of the diffusers names ai-toolkit writes under
#: ``diffusion_model.`` (for the native dialect)
NATIVE_HEADS = ("layers.", "noise_refiner.", "context_refiner.", "x_embedder.", "final_layer.", "cap_embedder.",
                "t_embedder.", "all_x_embedder.", "all_final_layer.", "time_caption_embed.")


def _hint(*words: str):
    def hint(metadata: Mapping[str, str]) -> bool:
        named = f"{metadata.get('ss_base_model_version', '')} {metadata.get('modelspec.architecture', '')}".lower()
        return any(w in named for w in words)
    return hint


#: the text encoders are LLMs under their transformers names (``layers.N.self_attn.q_proj``), flattened under
#: ``lora_te_`` as sd-scripts' Lumina 2 trainer writes them
_PREFIXES = {"lora_unet_": "transformer", "lora_te_": "text_encoder"}
_HOST_NAMES = {"transformer": HostNames("lora_unet_"), "text_encoder": HostNames("lora_te_", encoder="llm")}
#: ComfyUI's generic text-encoder LoRA names: ``text_encoders.`` + its clip state-dict key (comfy/text_encoders:
#: ``qwen3_4b`` for Z-Image, ``gemma2_2b`` for Lumina 2, the LLM under ``transformer.model.``)
COMFY_TEXT_ENCODERS = {"z-image": "text_encoders.qwen3_4b.transformer.model.",
                       "lumina2": "text_encoders.gemma2_2b.transformer.model."}

Z_IMAGE = Arch(
    id="z-image", title="Z-Image (Turbo / Base)", table_file="z-image.json.gz",
    kohya_prefixes=_PREFIXES, metadata_hint=_hint("z-image", "z_image", "zimage"),
    fused_layout=Z_IMAGE_NAMES.layout(),
    component_classes={"transformer": ("ZImageTransformer2DModel",), "text_encoder": ("Qwen3Model",)},
    host_names=_HOST_NAMES, checkpoint_prefixes={"model.diffusion_model.": "transformer"},
    comfy_classes=("ZImage",), catalog_names=("zimageturbo", "zimagebase", "z-image turbo"),
    comfy_text_encoders={"text_encoder": COMFY_TEXT_ENCODERS["z-image"]},
)
LUMINA2 = Arch(
    id="lumina2", title="Lumina-Image 2.0", table_file="lumina2.json.gz",
    kohya_prefixes=_PREFIXES, metadata_hint=_hint("lumina"),
    fused_layout=LUMINA2_NAMES.layout(),
    component_classes={"transformer": ("Lumina2Transformer2DModel",), "text_encoder": ("Gemma2Model",)},
    host_names=_HOST_NAMES, checkpoint_prefixes={"model.diffusion_model.": "transformer"},
    comfy_classes=("Lumina2",), catalog_names=("lumina",),
    comfy_text_encoders={"text_encoder": COMFY_TEXT_ENCODERS["lumina2"]},
)

#: the official configs: Z-Image-Turbo (= diffusers' defaults; Base has the same shapes) with Qwen3-4B, and
#: Lumina-Image-2.0 (Alpha-VLLM/Lumina-Image-2.0) with Gemma-2-2B
Z_IMAGE_CONFIGS = {
    "transformer": ("ZImageTransformer2DModel", dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30,
                                                     n_kv_heads=30, cap_feat_dim=2560)),
    "text_encoder": ("Qwen3Model", dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                                        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                        head_dim=128, tie_word_embeddings=True)),
}
LUMINA2_CONFIGS = {
    "transformer": ("Lumina2Transformer2DModel", dict(hidden_size=2304, num_layers=26, num_refiner_layers=2,
                                                      num_attention_heads=24, num_kv_heads=8, cap_feat_dim=2304)),
    "text_encoder": ("Gemma2Model", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                         num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                         head_dim=256)),
}
