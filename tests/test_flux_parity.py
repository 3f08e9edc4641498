"""FLUX.1 numerical parity with the real loaders: files in every Flux dialect that diffusers 0.42 loads
(kohya sd-scripts, XLabs, BFL Control LoRA, diffusers/PEFT) and files written by lycoris-lora (LoKr, LoHa),
all on a tiny random ``FluxTransformer2DModel``.

Oracles:
* diffusers: ``FluxPipeline(transformer=copy).load_lora_weights(file)`` + ``fuse_lora(lora_scale=s)``; the
  fused state dict is the expected result. The set of parameters that differ from the base there must equal
  the set ``patched_weights`` returns.
* lycoris-lora: the weights implied by the FORWARD pass of the hooked modules (its merge path applies alpha/r
  twice for LoHa/LoKr, dialects.md 3.10).

The files are written here from the format rules (dialects.md section 5), with the BFL (fused) shapes
derived from the tiny model's own diffusers modules.

diffusers' BFL converters hard-code FLUX.1-dev sizes (``dims=[3072, 3072, 3072, 12288]`` in the kohya
converter; ``num_layers = 19``, ``num_single_layers = 38``, ``inner_dim = 3072`` in the Control LoRA one).
For the tiny model those constants, and only those, are replaced by the tiny model's (see ``_sized``);
every substitution must hit exactly once, so a change in diffusers makes these tests fail loudly.

Three diffusers 0.42.1 bugs are worked around in the oracle, each pinned by a ``test_diffusers_*`` test:
* kohya: the converted img_in/txt_in/time_in/vector_in/guidance_in/final_layer keys lack the ``transformer.``
  prefix, so ``load_lora_weights(file)`` silently drops them (``kohya_state_dict`` restores the prefix);
* kohya: the final-layer ``.alpha`` is discarded (scale 1 instead of alpha/rank): the parity file uses
  alpha == rank there, and ``test_kohya_final_layer_alpha_is_applied`` folds alpha/rank into the downs;
* Control LoRA: ``swap_scale_shift`` is applied to ``adaLN_modulation.1.lora_A`` too (``control_state_dict``).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import textwrap
from pathlib import Path

import pytest
import toml
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import lora_conversion_utils, lora_pipeline
from lycoris.kohya import LycorisNetworkKohya, create_network
from lycoris.wrapper import LycorisNetwork
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_compat

# ------------------------------------------------------------------------------------------------------
# the tiny model
# ------------------------------------------------------------------------------------------------------
IN, JOINT, POOLED, HEAD, HEADS = 16, 32, 32, 16, 4
H = HEAD * HEADS  # 64
MLP = 4 * H  # 256
N_DOUBLE, N_SINGLE = 2, 2
CONFIG = dict(patch_size=1, in_channels=IN, num_layers=N_DOUBLE, num_single_layers=N_SINGLE,
              attention_head_dim=HEAD, num_attention_heads=HEADS, joint_attention_dim=JOINT,
              pooled_projection_dim=POOLED, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TOL = 1e-5


def make_flux(seed: int = 0) -> FluxTransformer2DModel:
    """fp32, every parameter (biases and RMSNorm weights too) drawn from N(0, 0.2^2)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**CONFIG).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.requires_grad_(False)


_MODEL: list[FluxTransformer2DModel] = []


def flux() -> FluxTransformer2DModel:
    """The shared base model (never modified: every oracle works on a deep copy)."""
    if not _MODEL:
        _MODEL.append(make_flux())
    return _MODEL[0]


# ------------------------------------------------------------------------------------------------------
# BFL (fused) names -> diffusers modules, in row order (dialects.md 5.1)
# ------------------------------------------------------------------------------------------------------
DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",), "modulation.lin": ("norm.linear",),
}
TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) in BFL, (scale, shift) in diffusers
}
NORMS_DOUBLE = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
                "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
NORMS_SINGLE = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def bfl_parts() -> dict[str, tuple[str, ...]]:
    """Every BFL Linear name of the tiny model -> the diffusers modules it fuses (row order)."""
    parts: dict[str, tuple[str, ...]] = {}
    for i in range(N_DOUBLE):
        parts.update({f"double_blocks.{i}.{k}": tuple(f"transformer_blocks.{i}.{p}" for p in v)
                      for k, v in DOUBLE.items()})
    for i in range(N_SINGLE):
        parts.update({f"single_blocks.{i}.{k}": tuple(f"single_transformer_blocks.{i}.{p}" for p in v)
                      for k, v in SINGLE.items()})
    parts.update({k: (v,) for k, v in TOP.items()})
    return parts


def bfl_norms() -> dict[str, str]:
    """BFL RMSNorm module -> diffusers RMSNorm module."""
    norms = {f"double_blocks.{i}.{k}": f"transformer_blocks.{i}.{v}"
             for i in range(N_DOUBLE) for k, v in NORMS_DOUBLE.items()}
    norms.update({f"single_blocks.{i}.{k}": f"single_transformer_blocks.{i}.{v}"
                  for i in range(N_SINGLE) for k, v in NORMS_SINGLE.items()})
    return norms


def bfl_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every BFL Linear, from the diffusers modules it fuses (rows concatenated)."""
    shapes = {}
    for bfl, parts in bfl_parts().items():
        weights = [model.get_submodule(p).weight for p in parts]
        assert len({w.shape[1] for w in weights}) == 1
        shapes[bfl] = (sum(w.shape[0] for w in weights), weights[0].shape[1])
    return shapes


def test_bfl_shape_arithmetic():
    shapes = bfl_shapes(flux())
    assert shapes["double_blocks.0.img_attn.qkv"] == (3 * H, H)
    assert shapes["double_blocks.0.img_mod.lin"] == (6 * H, H)
    assert shapes["single_blocks.0.linear1"] == (3 * H + MLP, H)
    assert shapes["single_blocks.0.linear2"] == (H, H + MLP)
    assert shapes["single_blocks.0.modulation.lin"] == (3 * H, H)
    assert shapes["final_layer.adaLN_modulation.1"] == (2 * H, H)
    assert shapes["final_layer.linear"] == (IN, H)
    assert shapes["img_in"] == (H, IN)
    assert len(shapes) == 10 * N_DOUBLE + 3 * N_SINGLE + 10


# ------------------------------------------------------------------------------------------------------
# writers, one per dialect
# ------------------------------------------------------------------------------------------------------
def _rand(gen: torch.Generator, *shape: int, std: float = 0.1) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).contiguous()


def _rank(name: str) -> int:
    """Varied ranks: 4 by default, 6 on the fused qkv/linear1 modules."""
    return 6 if name.endswith(("qkv", "linear1")) else 4


def write_kohya(path: Path, model, *, seed: int = 1, final_alpha_is_rank: bool = True,
                split_qkv: bool = False) -> Path:
    """sd-scripts ``networks/lora_flux.py``: ``lora_unet_<BFL path with _>.{lora_down,lora_up}.weight`` + ``.alpha``
    on every Linear of the transformer (full coverage incl. the optional in_dims layers and the final layer).

    ``alpha != rank`` everywhere, except on the two final-layer modules when ``final_alpha_is_rank``: diffusers'
    converter drops their alpha ("TODO: alphas" in ``assign_remaining_weights``), see
    ``test_kohya_final_layer_alpha_is_applied``. ``split_qkv``: the sd-scripts ``split_qkv=True`` layout on
    qkv and linear1 (down = the parts' rank-2 downs stacked, up block-diagonal; alpha kept while the stored
    rank is 3x2 / 4x2, as sd-scripts does), which diffusers converts on its block-sparse path.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for bfl, (out, inp) in bfl_shapes(model).items():
        key = "lora_unet_" + bfl.replace(".", "_")
        r = _rank(bfl)
        down, up = _rand(gen, r, inp), _rand(gen, out, r)
        if split_qkv and bfl.endswith(("attn.qkv", "linear1")):
            sizes = [H, H, H] + ([MLP] if bfl.endswith("linear1") else [])
            r = 2 * len(sizes)
            down, up = _rand(gen, r, inp), torch.zeros(out, r)
            row = 0
            for j, size in enumerate(sizes):
                up[row:row + size, 2 * j:2 * (j + 1)] = _rand(gen, size, 2)
                row += size
        alpha = float(r) if (final_alpha_is_rank and bfl.startswith("final_layer")) else 0.5 * r + 1.0
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1"})
    return path


def kohya_to_bfl(src: Path, dst: Path, *, peft_names: bool = False) -> Path:
    """``lora_unet_<flat BFL>`` → ``diffusion_model.<dotted BFL>``, any suffix (ComfyUI-native LoRA, BFL LoKr;
    diffusers' kohya loader maps the former back). ``peft_names``: ai-toolkit's BFL-named layout instead,
    ``lora_A``/``lora_B`` and no alpha tensors (ai-toolkit saves none: scale 1)."""
    dotted = {"lora_unet_" + bfl.replace(".", "_"): bfl for bfl in bfl_parts()}
    out = {}
    for key, value in load_file(str(src)).items():
        module, _, suffix = key.partition(".")
        if peft_names:
            if suffix == "alpha":
                continue
            suffix = suffix.replace("lora_down", "lora_A").replace("lora_up", "lora_B")
        out[f"diffusion_model.{dotted[module]}.{suffix}"] = value
    save_file(out, str(dst))
    return dst


def write_xlabs(path: Path, model, *, seed: int = 2, prefix: str = "") -> Path:
    """x-flux processors: double blocks ``qkv_lora{1,2}``/``proj_lora{1,2}`` (1 = image, 2 = text stream),
    single blocks ``qkv_lora`` (first 3H rows of linear1) and ``proj_lora`` (linear2). No alpha."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def pair(name: str, out: int, inp: int, r: int) -> None:
        tensors[f"{prefix}{name}.down.weight"] = _rand(gen, r, inp)
        tensors[f"{prefix}{name}.up.weight"] = _rand(gen, out, r)

    for i in range(N_DOUBLE):
        for stream in ("1", "2"):
            pair(f"double_blocks.{i}.processor.qkv_lora{stream}", 3 * H, H, 4)
            pair(f"double_blocks.{i}.processor.proj_lora{stream}", H, H, 3)
    for i in range(N_SINGLE):
        pair(f"single_blocks.{i}.processor.qkv_lora", 3 * H, H, 4)
        pair(f"single_blocks.{i}.processor.proj_lora", H, H + MLP, 5)
    save_file(tensors, str(path))
    return path


def write_bfl_control(path: Path, model, *, seed: int = 3, rank: int = 8) -> Path:
    """FLUX.1 Depth/Canny LoRA: bare BFL names, ``lora_A.weight``/``lora_B.weight``/``lora_B.bias`` on every
    Linear (final_layer.linear at half rank), ``img_in.lora_A`` with 2*in_channels inputs, and the query/key
    RMSNorm ``.scale`` stored whole."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for bfl, (out, inp) in bfl_shapes(model).items():
        r = rank // 2 if bfl == "final_layer.linear" else rank
        if bfl == "img_in":
            inp = 2 * inp
        tensors[f"{bfl}.lora_A.weight"] = _rand(gen, r, inp)
        tensors[f"{bfl}.lora_B.weight"] = _rand(gen, out, r)
        tensors[f"{bfl}.lora_B.bias"] = _rand(gen, out)
    for bfl, norm in bfl_norms().items():
        tensors[f"{bfl}.scale"] = 1.0 + _rand(gen, model.get_submodule(norm).weight.shape[0], std=0.3)
    save_file(tensors, str(path))
    return path


def flux_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def write_diffusers(path: Path, model, modules: list[str], *, seed: int = 4, bias: bool = False,
                    rank: int | None = None, adapter_metadata: dict | None = None) -> Path:
    """``FluxPipeline.save_lora_weights`` layout: ``transformer.<module>.lora_A.weight``/``lora_B.weight``
    (+ ``lora_B.bias`` with peft ``lora_bias=True``); ranks vary per module; scaling only through the
    ``lora_adapter_metadata`` header (diffusers packs the LoraConfig with the component prefix); ``rank``
    makes every module's rank the same (as the metadata's single ``r`` says)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(modules):
        w = model.get_submodule(name).weight
        r = rank or 2 + i % 3
        tensors[f"transformer.{name}.lora_A.weight"] = _rand(gen, r, w.shape[1])
        tensors[f"transformer.{name}.lora_B.weight"] = _rand(gen, w.shape[0], r)
        if bias:
            tensors[f"transformer.{name}.lora_B.bias"] = _rand(gen, w.shape[0])
    metadata = {"format": "pt"}
    if adapter_metadata is not None:
        metadata["lora_adapter_metadata"] = json.dumps(
            {f"transformer.{k}": v for k, v in adapter_metadata.items()})
    save_file(tensors, str(path), metadata)
    return path


# ------------------------------------------------------------------------------------------------------
# the diffusers oracle
# ------------------------------------------------------------------------------------------------------
def _sized(name: str, replacements: dict[str, str]):
    """diffusers' converter ``name`` with its FLUX.1-dev size constants replaced (each exactly once)."""
    src = textwrap.dedent(inspect.getsource(getattr(lora_conversion_utils, name)))
    for old, new in replacements.items():
        assert src.count(old) == 1, f"{name}: expected one {old!r} in diffusers' source"
        src = src.replace(old, new)
    namespace = dict(vars(lora_conversion_utils))
    exec(compile(src, lora_conversion_utils.__file__, "exec"), namespace)
    return namespace[name]


@contextlib.contextmanager
def tiny_converters():
    """Swap diffusers' Flux converters (as imported by lora_pipeline) for tiny-model-sized copies."""
    patched = {
        "_convert_kohya_flux_lora_to_diffusers": _sized(
            "_convert_kohya_flux_lora_to_diffusers",
            {"dims=[3072, 3072, 3072, 12288]": f"dims=[{H}, {H}, {H}, {MLP}]"}),
        "_convert_bfl_flux_control_lora_to_diffusers": _sized(
            "_convert_bfl_flux_control_lora_to_diffusers",
            {"num_layers = 19": f"num_layers = {N_DOUBLE}", "num_single_layers = 38": f"num_single_layers = {N_SINGLE}",
             "inner_dim = 3072": f"inner_dim = {H}"}),
    }
    saved = {k: getattr(lora_pipeline, k) for k in patched}
    try:
        for k, v in patched.items():
            setattr(lora_pipeline, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(lora_pipeline, k, v)


def diffusers_pipeline(model) -> FluxPipeline:
    return FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)


#: top-level modules whose converted kohya keys diffusers 0.42.1 leaves without the ``transformer.`` prefix
TOP_LEVEL_DIFFUSERS = tuple(f"{v}." for v in TOP.values())


def kohya_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """diffusers' own conversion of a kohya Flux file, with the ``transformer.`` prefix restored.

    ``_convert_kohya_flux_lora_to_diffusers`` writes the img_in/txt_in/time_in/vector_in/guidance_in and
    final_layer LoRAs as ``x_embedder.lora_A.weight`` ... (no ``transformer.`` prefix), and
    ``load_lora_adapter(prefix="transformer")`` then drops them without a word: ``pipe.load_lora_weights(file)``
    silently ignores those 10 modules. Their math (alpha/rank, the adaLN half swap) is still diffusers'."""
    with tiny_converters():
        converted = FluxPipeline.lora_state_dict(str(path))
    bare = [k for k in converted if not k.startswith(("transformer.", "text_encoder."))]
    assert all(k.startswith(TOP_LEVEL_DIFFUSERS) for k in bare), bare
    return {(f"transformer.{k}" if k in bare else k): v for k, v in converted.items()}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' ``swap_scale_shift``: (shift, scale) <-> (scale, shift) along dim 0."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


ADALN = "final_layer.adaLN_modulation.1"


def control_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A Control LoRA file as given to diffusers, with ``final_layer.adaLN_modulation.1.lora_A`` pre-swapped.

    ``_convert_bfl_flux_control_lora_to_diffusers`` applies ``swap_scale_shift`` to lora_A as well as lora_B
    (``for lora_key in ["lora_A", "lora_B"]: ... = swap_scale_shift(...)``), i.e. it permutes the RANK halves
    of A: ΔW = swap(B)·swap(A) instead of swap(B)·A (``test_diffusers_control_adaln_swaps_lora_A_too``).
    Pre-swapping A cancels that so the oracle is diffusers' (correct) swap of the output rows only."""
    tensors = load_file(str(path))
    tensors[f"{ADALN}.lora_A.weight"] = swap_halves(tensors[f"{ADALN}.lora_A.weight"])
    return tensors


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def diffusers_fused(path: Path, base, strength: float = 1.0) -> tuple[FluxTransformer2DModel, dict[str, torch.Tensor]]:
    """Load ``path`` with diffusers into a copy of ``base``, fuse at ``strength``; returns the model and its
    state dict under the plain (un-PEFT-wrapped) parameter names. kohya files go through ``kohya_state_dict``,
    Control LoRAs through ``control_state_dict`` (two diffusers 0.42.1 bugs, see there)."""
    model = copy.deepcopy(base)
    pipe = diffusers_pipeline(model)
    keys = _keys(path)
    source: str | dict = str(path)
    if any(k.endswith(".lora_down.weight") for k in keys):
        source = kohya_state_dict(path)
    elif any(k.endswith("query_norm.scale") for k in keys):
        source = control_state_dict(path)
    with tiny_converters():
        pipe.load_lora_weights(source)
    pipe.fuse_lora(components=["transformer"], lora_scale=strength)
    state = {k.replace(".base_layer.", "."): v.detach().clone()
             for k, v in pipe.transformer.state_dict().items() if ".lora_" not in k}
    return pipe.transformer, state


def changed_params(base, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters of the fused state dict that differ from the base (value or shape)."""
    original = base.state_dict()
    assert set(fused) == set(original), sorted(set(fused) ^ set(original))[:10]
    return {k: v for k, v in fused.items()
            if v.shape != original[k].shape or not torch.equal(v, original[k])}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], prefix: str = "transformer.") -> None:
    """Same parameter set (no missing, no extra) and every value within TOL relative error."""
    got = {k.removeprefix(prefix): v for k, v in got.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:8]} ({len(missing)}), extra {extra[:8]} ({len(extra)})"
    bad = {}
    for key, value in expected.items():
        assert got[key].shape == value.shape, f"{key}: shape {tuple(got[key].shape)} != {tuple(value.shape)}"
        err = rel_err(got[key], value)
        if not err < TOL:
            bad[key] = err
    assert not bad, "relative error >= 1e-5: " + ", ".join(f"{k} {e:.2e}" for k, e in sorted(bad.items())[:12])


def check_against_diffusers(path: Path, strength: float = 1.0) -> dict[str, torch.Tensor]:
    base = flux()
    _, fused = diffusers_fused(path, base, strength)
    expected = changed_params(base, fused)
    assert expected, "diffusers changed nothing"
    got = lora_compat.patched_weights(path, {"transformer": base}, strength)
    assert_same(got, expected)
    return expected


# ------------------------------------------------------------------------------------------------------
# diffusers-loadable dialects
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_kohya_flux_full_coverage_matches_diffusers(tmp_path, strength):
    path = write_kohya(tmp_path / "kohya.safetensors", flux())
    info = lora_compat.inspect(path)
    assert (info.dialect, info.base) == ("kohya", "flux1")
    expected = check_against_diffusers(path, strength)
    # every Linear weight of the model is touched, nothing else (kohya LoRAs carry no bias delta)
    assert set(expected) == {f"{n}.weight" for n in flux_linears(flux())}


def test_kohya_flux_split_qkv_matches_diffusers(tmp_path):
    """sd-scripts ``split_qkv=True`` files: block-diagonal up on qkv (diffusers takes its sparse path)."""
    path = write_kohya(tmp_path / "kohya_split.safetensors", flux(), split_qkv=True)
    check_against_diffusers(path, 0.8)


def test_comfy_bfl_lora_down_matches_diffusers(tmp_path):
    """ComfyUI-native ``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`` (+ alpha)."""
    path = kohya_to_bfl(write_kohya(tmp_path / "k.safetensors", flux()), tmp_path / "comfy.safetensors")
    assert lora_compat.inspect(path).dialect in ("bfl", "kohya")
    check_against_diffusers(path, 0.9)


def test_aitoolkit_bfl_lora_A_matches_diffusers_on_the_kohya_equivalent(tmp_path):
    """ai-toolkit ``diffusion_model.<BFL>.lora_A/lora_B`` (no alpha: scale 1). diffusers does not load this
    layout (no converter: the keys lack the ``transformer.`` prefix and are dropped), so the oracle is diffusers
    on the same tensors in kohya layout without alpha (alpha defaults to the rank: scale 1)."""
    kohya = write_kohya(tmp_path / "k.safetensors", flux())
    path = kohya_to_bfl(kohya, tmp_path / "aitk.safetensors", peft_names=True)
    no_alpha = {k: v for k, v in load_file(str(kohya)).items() if not k.endswith(".alpha")}
    save_file(no_alpha, str(tmp_path / "k_no_alpha.safetensors"))
    assert lora_compat.inspect(path).dialect == "bfl"
    base = flux()
    expected = changed_params(base, diffusers_fused(tmp_path / "k_no_alpha.safetensors", base, 0.8)[1])
    assert_same(lora_compat.patched_weights(path, {"transformer": base}, 0.8), expected)


def test_kohya_final_layer_alpha_is_applied(tmp_path):
    """sd-scripts scales every module (final layer included) by alpha/rank; diffusers 0.42 drops the final
    layer's alpha. Oracle: diffusers on the same file with alpha/rank folded into those two downs."""
    path = write_kohya(tmp_path / "kohya_alpha.safetensors", flux(), final_alpha_is_rank=False)
    tensors = load_file(str(path))
    for key in ("lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"):
        alpha = tensors[f"{key}.alpha"].item()
        rank = tensors[f"{key}.lora_down.weight"].shape[0]
        assert alpha != rank
        tensors[f"{key}.lora_down.weight"] = tensors[f"{key}.lora_down.weight"] * (alpha / rank)
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    folded = tmp_path / "kohya_alpha_folded.safetensors"
    save_file(tensors, str(folded))
    base = flux()
    expected = changed_params(base, diffusers_fused(folded, base)[1])
    assert_same(lora_compat.patched_weights(path, {"transformer": base}), expected)


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_matches_diffusers(tmp_path, prefix):
    path = write_xlabs(tmp_path / "xlabs.safetensors", flux(), prefix=prefix)
    assert lora_compat.inspect(path).dialect == "xlabs"
    expected = check_against_diffusers(path, 0.9)
    # single-block qkv_lora covers q, k, v of linear1 only: proj_mlp is untouched
    assert "single_transformer_blocks.0.attn.to_q.weight" in expected
    assert "single_transformer_blocks.0.proj_mlp.weight" not in expected


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_bfl_control_matches_diffusers(tmp_path, strength):
    path = write_bfl_control(tmp_path / "control.safetensors", flux())
    info = lora_compat.inspect(path)
    # header-only: a tiny file fits no full-size base and names none in metadata, so only a candidate
    assert info.dialect == "bfl-control" and info.base_candidates == ["flux1"]
    base = flux()
    model, fused = diffusers_fused(path, base, strength)
    assert model.x_embedder.weight.shape == (H, 2 * IN) and model.config.in_channels == 2 * IN
    expected = changed_params(base, fused)
    got = lora_compat.patched_weights(path, {"transformer": base}, strength)
    assert_same(got, expected)
    # every Linear's weight and bias, and every q/k RMSNorm weight
    assert set(expected) == ({f"{n}.{p}" for n in flux_linears(base) for p in ("weight", "bias")}
                             | {f"{n}.weight" for n in bfl_norms().values()})
    assert got["transformer.x_embedder.weight"].shape == (H, 2 * IN)
    stored = load_file(str(path))
    for bfl, norm in bfl_norms().items():  # set, whatever the strength
        assert torch.equal(got[f"transformer.{norm}.weight"], stored[f"{bfl}.scale"]), norm


# -- the diffusers 0.42.1 behaviours the oracle works around (these fail, on purpose, once diffusers changes) --
def _raw_diffusers_fused(source, base) -> dict[str, torch.Tensor]:
    pipe = diffusers_pipeline(copy.deepcopy(base))
    with tiny_converters():
        pipe.load_lora_weights(source)
    pipe.fuse_lora(components=["transformer"])
    return {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if ".lora_" not in k}


def test_diffusers_kohya_loader_drops_top_level_modules(tmp_path):
    path = write_kohya(tmp_path / "kohya.safetensors", flux())
    changed = changed_params(flux(), _raw_diffusers_fused(str(path), flux()))
    assert "transformer_blocks.0.attn.to_q.weight" in changed
    assert not [k for k in changed if k.startswith(TOP_LEVEL_DIFFUSERS)]  # silently ignored


def test_diffusers_kohya_loader_drops_final_layer_alpha(tmp_path):
    path = write_kohya(tmp_path / "kohya.safetensors", flux(), final_alpha_is_rank=False)
    fused = _raw_diffusers_fused(kohya_state_dict(path), flux())
    stored = load_file(str(path))
    down, up = (stored[f"lora_unet_final_layer_adaLN_modulation_1.lora_{r}.weight"] for r in ("down", "up"))
    delta = fused["norm_out.linear.weight"] - flux().norm_out.linear.weight
    assert rel_err(delta, swap_halves(up) @ down) < TOL  # scale 1, not alpha/rank


def test_diffusers_control_adaln_swaps_lora_A_too(tmp_path):
    path = write_bfl_control(tmp_path / "control.safetensors", flux())
    fused = _raw_diffusers_fused(str(path), flux())
    stored = load_file(str(path))
    a, b = stored[f"{ADALN}.lora_A.weight"], stored[f"{ADALN}.lora_B.weight"]
    delta = fused["norm_out.linear.weight"] - flux().norm_out.linear.weight
    assert rel_err(delta, swap_halves(b) @ swap_halves(a)) < TOL
    assert rel_err(delta, swap_halves(b) @ a) > 0.1


def _diffusers_variants(model) -> dict[str, dict]:
    linears = flux_linears(model)
    partial = [n for n in linears
               if not (n.startswith(("transformer_blocks.0.attn.", "single_transformer_blocks.1.attn."))
                       and n.endswith(("to_k", "add_k_proj", "add_v_proj")))
               and n != "single_transformer_blocks.1.proj_mlp"]
    return {
        "full": dict(modules=linears),
        # only to_q/to_v (+ add_q_proj) in transformer_blocks.0, only to_q/to_v in single block 1 (no proj_mlp)
        "partial_qkv": dict(modules=partial),
        "lora_bias": dict(modules=linears, bias=True),
        "alpha_metadata": dict(modules=linears, rank=4, adapter_metadata={
            "r": 4, "lora_alpha": 6, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
            "use_rslora": False, "lora_bias": False,
            "target_modules": linears}),
    }


@pytest.mark.parametrize("variant", ["full", "partial_qkv", "lora_bias", "alpha_metadata"])
def test_diffusers_format_matches_diffusers(tmp_path, variant):
    spec = _diffusers_variants(flux())[variant]
    path = write_diffusers(tmp_path / f"{variant}.safetensors", flux(), **spec)
    assert lora_compat.inspect(path).dialect == "diffusers"
    expected = check_against_diffusers(path, 0.75)
    if variant == "partial_qkv":
        assert "transformer_blocks.0.attn.to_q.weight" in expected
        assert "transformer_blocks.0.attn.to_k.weight" not in expected
        assert "single_transformer_blocks.1.proj_mlp.weight" not in expected
    if variant == "lora_bias":
        assert "transformer_blocks.0.attn.to_q.bias" in expected


# ------------------------------------------------------------------------------------------------------
# hot vs merge on the real forward
# ------------------------------------------------------------------------------------------------------
def flux_inputs(seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(16, 3)
    return dict(hidden_states=torch.randn(1, 16, IN, generator=gen),
                encoder_hidden_states=torch.randn(1, 8, JOINT, generator=gen),
                pooled_projections=torch.randn(1, POOLED, generator=gen),
                timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]),
                img_ids=img_ids, txt_ids=torch.zeros(8, 3))


@torch.no_grad()
def forward(model, inputs) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def test_hot_matches_merge_and_diffusers_forward(tmp_path):
    path = write_kohya(tmp_path / "kohya.safetensors", flux())
    inputs = flux_inputs()
    hot_model, merge_model = copy.deepcopy(flux()), copy.deepcopy(flux())
    before = forward(hot_model, inputs)
    hot = lora_compat.Patcher(hot_model, mode="hot")
    merge = lora_compat.Patcher(merge_model, mode="merge")
    hot.set([(path, 0.8)])
    merge.set([(path, 0.8)])
    out_hot, out_merge = forward(hot_model, inputs), forward(merge_model, inputs)
    reference = forward(diffusers_fused(path, flux(), 0.8)[0], inputs)
    assert rel_err(out_merge, before) > 1e-2  # the LoRA does something
    assert rel_err(out_hot, out_merge) < TOL
    assert rel_err(out_merge, reference) < TOL
    hot.close()
    merge.close()
    for model in (hot_model, merge_model):
        assert all(torch.equal(v, flux().state_dict()[k]) for k, v in model.state_dict().items())


def test_control_lora_merge_forward_and_hot_refusal(tmp_path):
    """Control LoRA through the Patcher: merge mode widens x_embedder (config follows) and sets the norms, and
    its forward equals diffusers' fused model; hot mode refuses (it never changes shapes) and touches nothing."""
    path = write_bfl_control(tmp_path / "control.safetensors", flux())
    inputs = flux_inputs()
    control = torch.randn(1, 16, IN, generator=torch.Generator().manual_seed(6))
    inputs["hidden_states"] = torch.cat([inputs["hidden_states"], control], dim=-1)
    reference = forward(diffusers_fused(path, flux(), 1.0)[0], inputs)

    model = copy.deepcopy(flux())
    patcher = lora_compat.Patcher(model, mode="merge")
    patcher.set([(path, 1.0)])
    assert model.x_embedder.weight.shape == (H, 2 * IN) and model.config.in_channels == 2 * IN
    assert rel_err(forward(model, inputs), reference) < TOL
    patcher.close()
    assert model.x_embedder.weight.shape == (H, IN) and model.config.in_channels == IN
    assert all(torch.equal(v, flux().state_dict()[k]) for k, v in model.state_dict().items())

    model = copy.deepcopy(flux())
    patcher = lora_compat.Patcher(model, mode="hot")
    with pytest.raises(lora_compat.LoraCompatError, match="widens"):
        patcher.set([(path, 1.0)])
    assert all(torch.equal(v, flux().state_dict()[k]) for k, v in model.state_dict().items())
    patcher.close()


# ------------------------------------------------------------------------------------------------------
# lycoris-lora (LoKr, LoHa) on Flux names
# ------------------------------------------------------------------------------------------------------
_PRESET_ATTRS = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME", "LORA_PREFIX")
LYCORIS_ARGS = {  # algo -> (dim, alpha, extra kwargs)
    "lokr": (2, 1.5, {"factor": 4}),
    "loha": (4, 3.0, {}),
}


@contextlib.contextmanager
def _lycoris_preset(preset: dict):
    saved = {a: getattr(LycorisNetwork, a) for a in _PRESET_ATTRS}
    try:
        LycorisNetwork.MODULE_ALGO_MAP, LycorisNetwork.NAME_ALGO_MAP = {}, {}
        LycorisNetwork.TARGET_EXCLUDE_NAME, LycorisNetwork.TARGET_REPLACE_NAME = [], []
        LycorisNetwork.apply_preset(preset)
        yield
    finally:
        for a, v in saved.items():
            setattr(LycorisNetwork, a, v)


@torch.no_grad()
def _linear_from_forward(module: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) implied by a (hooked) Linear's forward: feed 0 and the unit vectors."""
    x = torch.cat([torch.zeros(1, module.in_features), torch.eye(module.in_features)])
    y = module(x)
    return (y[1:] - y[0]).T.contiguous(), y[0]


@torch.no_grad()
def _randomize_lycoris(network, seed: int) -> None:
    # network.loras, not network.parameters(): lycoris registers its modules only in apply_to, so before it the
    # network has no parameters and LoKr's w2_b / LoHa's w2_a would stay at their zero init (a zero delta)
    gen = torch.Generator().manual_seed(seed)
    for lora in network.loras:
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def write_lycoris(path: Path, root: torch.nn.Module, algo: str, *, seed: int = 7,
                  multiplier: float = 1.0) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """LycorisNetwork (``lycoris_`` prefix, SimpleTuner's naming) over every Linear of ``root``; returns the
    file and {module path: (weight, bias)} implied by lycoris' forward at ``multiplier``."""
    dim, alpha, kwargs = LYCORIS_ARGS[algo]
    root = copy.deepcopy(root)
    with _lycoris_preset({"enable_conv": False, "target_module": ["Linear"], "target_name": [],
                          "lora_prefix": "lycoris", "use_fnmatch": False}):
        network = LycorisNetwork(root, multiplier=multiplier, lora_dim=dim, alpha=alpha,
                                 network_module=algo, **kwargs)
    _randomize_lycoris(network, seed)
    network.apply_to()
    network.eval().requires_grad_(False)
    network.save_weights(str(path), None, {"ss_network_module": "lycoris.kohya",
                                           "ss_network_args": json.dumps({"algo": algo})})
    where = {id(m): n for n, m in root.named_modules()}
    implied = {}
    for lora in network.loras:
        module = lora.org_module[0]
        implied[where[id(module)]] = _linear_from_forward(module)
    return path, implied


def _expected_from_implied(base, implied: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    expected = {}
    for name, (weight, bias) in implied.items():
        # not a probe's rounding of an unchanged weight: a real delta
        assert rel_err(weight, base.get_submodule(name).weight) > 1e-3, f"{name}: lycoris' forward changes nothing"
        expected[f"{name}.weight"] = weight
        # LoKr/LoHa do not change the bias: the forward must reproduce it (sanity of the probe)
        module_bias = base.get_submodule(name).bias
        if module_bias is None:  # FLUX.2's Linears have none: the forward's must be exactly zero
            assert not bias.any(), name
        else:
            assert rel_err(bias, module_bias) < 1e-6
    return expected


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_diffusers_names_match_lycoris_forward(tmp_path, algo):
    """``lycoris_transformer_blocks_0_attn_to_q.lokr_w1`` ... (SimpleTuner) on the diffusers Flux model."""
    base = flux()
    path, implied = write_lycoris(tmp_path / f"{algo}.safetensors", base, algo)
    assert len(implied) == len(flux_linears(base))
    expected = _expected_from_implied(base, implied)
    got = lora_compat.patched_weights(path, {"transformer": base})
    assert_same(got, expected)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_strength_matches_lycoris_multiplier(tmp_path, algo):
    base = flux()
    path, implied = write_lycoris(tmp_path / f"{algo}_m.safetensors", base, algo, multiplier=0.6)
    assert_same(lora_compat.patched_weights(path, {"transformer": base}, 0.6), _expected_from_implied(base, implied))


class _Bfl(torch.nn.Module):
    """A BFL-layout (fused) shadow of the tiny diffusers model: ``double_blocks.0.img_attn.qkv`` etc. as real
    Linear modules holding the row-concatenated diffusers weights (halves swapped on adaLN_modulation.1)."""

    def __init__(self, model):
        super().__init__()
        for bfl, parts in bfl_parts().items():
            weight = torch.cat([model.get_submodule(p).weight for p in parts])
            bias = torch.cat([model.get_submodule(p).bias for p in parts])
            if bfl == ADALN:
                weight, bias = swap_halves(weight), swap_halves(bias)
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
            linear.weight.data.copy_(weight)
            linear.bias.data.copy_(bias)
            self._put(bfl, linear)

    def _put(self, dotted: str, module: torch.nn.Module) -> None:
        parent: torch.nn.Module = self
        *path, leaf = dotted.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)


@pytest.mark.parametrize("naming", ["lora_unet", "diffusion_model"])
@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_kohya_bfl_names_match_lycoris_forward(tmp_path, algo, naming):
    """sd-scripts + ``lycoris.kohya`` on the BFL model: ``lora_unet_double_blocks_0_img_attn_qkv.lokr_w1`` ...
    (and the same tensors as ``diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1``, the BFL LoKr layout).
    The fused delta (lycoris forward on the fused module) is compared row-sliced on the diffusers modules."""
    base = flux()
    shadow = _Bfl(base)
    dim, alpha, kwargs = LYCORIS_ARGS[algo]
    preset = {"enable_conv": False, "use_fnmatch": False, "unet_target_module": ["Linear"], "unet_target_name": [],
              "text_encoder_target_module": [], "text_encoder_target_name": []}
    attrs = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
             "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
             "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {a: getattr(LycorisNetworkKohya, a) for a in attrs}
    preset_path = tmp_path / "preset.toml"
    preset_path.write_text(toml.dumps(preset))
    try:
        LycorisNetworkKohya.MODULE_ALGO_MAP, LycorisNetworkKohya.NAME_ALGO_MAP = {}, {}
        LycorisNetworkKohya.TARGET_EXCLUDE_NAME = []
        network = create_network(1.0, dim, alpha, None, None, shadow, warn_on_unmatched=False,
                                 preset=str(preset_path), algo=algo, **kwargs)
    finally:
        for a, v in saved.items():
            setattr(LycorisNetworkKohya, a, v)
    _randomize_lycoris(network, 8)
    network.apply_to(None, shadow, apply_text_encoder=False, apply_unet=True)
    network.eval().requires_grad_(False)
    path = tmp_path / f"bfl_{algo}.safetensors"
    network.save_weights(str(path), None, {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "flux1",
                                           "ss_network_args": json.dumps({"algo": algo})})
    keys = _keys(path)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in keys), keys[:5]
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in keys)

    where = {id(m): n for n, m in shadow.named_modules()}
    expected: dict[str, torch.Tensor] = {}
    for lora in network.loras:
        module = lora.org_module[0]
        bfl = where[id(module)]
        weight, _ = _linear_from_forward(module)
        if bfl == ADALN:
            weight = swap_halves(weight)
        row = 0
        for part in bfl_parts()[bfl]:
            rows = base.get_submodule(part).weight.shape[0]
            expected[f"{part}.weight"] = weight[row:row + rows]
            row += rows
    assert len(expected) == len(flux_linears(base))
    assert all(rel_err(v, base.state_dict()[k]) > 1e-3 for k, v in expected.items())  # a delta on every weight
    if naming == "diffusion_model":
        path = kohya_to_bfl(path, tmp_path / f"dm_{algo}.safetensors")
        assert lora_compat.inspect(path).dialect == "bfl"
    else:
        assert lora_compat.inspect(path).base == "flux1"
    assert_same(lora_compat.patched_weights(path, {"transformer": base}), expected)
