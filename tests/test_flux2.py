"""FLUX.2: exact application of its layouts on a tiny ``Flux2Transformer2DModel`` with random weights (no hub).

Expected weights come from diffusers (``Flux2Pipeline.load_lora_weights`` + ``fuse_lora``, with its own converters
for the ai-toolkit ``diffusion_model.`` and kohya layouts) where diffusers loads the layout, and from an
independent computation in this file where it does not (ComfyUI ``lora_down``/``lora_up`` + ``alpha`` files, which
diffusers drops; kohya modulation layers, which it drops; LoKr on the fused BFL ``qkv``).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from family_parity import assert_matches, assert_patcher_matches, diffusers_fused, peft_lora_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=8, mlp_ratio=3.0,
            axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True)
WIDTH = 16
RANK, ALPHA = 4, 2.0
#: BFL module of ``double_blocks.N`` → the diffusers modules of ``transformer_blocks.N`` it holds, in row order
#: (diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers``)
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "img_attn.proj": ("attn.to_out.0",), "txt_attn.proj": ("attn.to_add_out",),
          "img_mlp.0": ("ff.linear_in",), "img_mlp.2": ("ff.linear_out",),
          "txt_mlp.0": ("ff_context.linear_in",), "txt_mlp.2": ("ff_context.linear_out",)}
SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
TOP = {"img_in": "x_embedder", "txt_in": "context_embedder",
       "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
       "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
       "final_layer.linear": "proj_out"}
MODULATION = {"double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
              "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
              "single_stream_modulation.lin": "single_stream_modulation.linear"}
#: BFL chunks it (shift, scale), diffusers (scale, shift)
FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = diffusers.Flux2Transformer2DModel(**TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def _bfl_modules(model: torch.nn.Module, modulation: bool = True, final: bool = True
                 ) -> dict[str, tuple[tuple[str, ...], int, int]]:
    """BFL module → (its diffusers parts, rows, columns); ``final``: with the final adaLN modulation."""
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found: dict[str, tuple[tuple[str, ...], int, int]] = {}
    groups = {f"double_blocks.{i}.{b}": tuple(f"transformer_blocks.{i}.{p}" for p in parts)
              for i in range(TINY["num_layers"]) for b, parts in DOUBLE.items()}
    groups.update({f"single_blocks.{i}.{b}": (f"single_transformer_blocks.{i}.{p}",)
                   for i in range(TINY["num_single_layers"]) for b, p in SINGLE.items()})
    groups.update({b: (p,) for b, p in TOP.items()})
    if modulation:
        groups.update({b: (p,) for b, p in MODULATION.items()})
    if modulation and final:
        groups[FINAL_MOD[0]] = (FINAL_MOD[1],)
    for bfl, parts in groups.items():
        found[bfl] = (parts, sum(shapes[p][0] for p in parts), shapes[parts[0]][1])
    return found


def _random_lora(modules, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(RANK, cols, generator=g) * 0.3, torch.randn(rows, RANK, generator=g) * 0.3)
            for name, (_, rows, cols) in modules.items()}


def _save_bfl(lora, path: Path, kohya_names: bool = False, down_up: bool = False, alpha: float | None = None,
              prefix: str = "diffusion_model.") -> Path:
    tensors = {}
    for name, (down, up) in lora.items():
        key = "lora_unet_" + name.replace(".", "_") if kohya_names else prefix + name
        if down_up:
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def _expected(model, modules, lora, scale: float) -> dict[str, torch.Tensor]:
    """The independent computation: each BFL module's delta ``scale * up @ down``, split by rows into its diffusers
    parts (``norm_out.linear`` with its halves swapped), added to the model's weights."""
    params = dict(model.named_parameters())
    out = {}
    for bfl, (down, up) in lora.items():
        delta = scale * (up @ down)
        if bfl == FINAL_MOD[0]:
            shift, scl = delta.chunk(2)
            delta = torch.cat([scl, shift])
        parts = modules[bfl][0]
        for part, rows in zip(parts, delta.chunk(len(parts))):
            out[f"transformer.{part}.weight"] = params[f"{part}.weight"].detach() + rows
    return out


def _diffusers_fused(model, path: Path, strength: float = 1.0) -> dict[str, torch.Tensor]:
    return diffusers_fused(model, path, lambda t: diffusers.Flux2Pipeline(
        scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=t), strength)


def _assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: torch.nn.Module):
    assert_matches(got, expected, model, unchanged_ok=True)  # a BFL qkv holds k's zero rows when q, v are trained


@pytest.fixture(scope="module")
def model():
    return _model()


def _peft_file(model, path: Path, seed: int = 1) -> Path:
    """A LoRA on every Linear module written by peft + ``Flux2Pipeline.save_lora_weights``."""
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return peft_lora_file(model, path, diffusers.Flux2Pipeline, targets, RANK, ALPHA, seed)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_diffusers_file_equals_diffusers(model, tmp_path, strength):
    path = _peft_file(model, tmp_path / "flux2_diffusers.safetensors")
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.base_candidates, detection.patchset.unmatched) == ("diffusers",
                                                                                             ["flux2"], {})
    got = lora_compat.patched_weights(path, {"transformer": model}, strength)
    _assert_matches(got, _diffusers_fused(model, path, strength), model)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_ai_toolkit_file_equals_diffusers(model, tmp_path, strength):
    """``diffusion_model.<BFL>`` + ``lora_A``/``lora_B`` (scale 1): diffusers splits qkv, we do too. Without
    ``final_layer.adaLN_modulation.1``: diffusers' LoRA converter renames it to ``norm_out.linear`` without swapping
    its (shift, scale) halves, as its checkpoint converter does (a diffusers bug; the next tests check it)."""
    modules = _bfl_modules(model, final=False)
    path = _save_bfl(_random_lora(modules, 2), tmp_path / "flux2_aitk.safetensors")
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.base_candidates, detection.patchset.unmatched) == ("bfl", ["flux2"], {})
    got = lora_compat.patched_weights(path, {"transformer": model}, strength)
    _assert_matches(got, _diffusers_fused(model, path, strength), model)


def test_kohya_file_equals_diffusers(model, tmp_path):
    """musubi/kohya ``lora_unet_`` + ``alpha``; no modulation keys (diffusers drops those: next test)."""
    modules = {k: v for k, v in _bfl_modules(model, modulation=False).items()}
    path = _save_bfl(_random_lora(modules, 3), tmp_path / "flux2_kohya.safetensors", kohya_names=True, down_up=True,
                     alpha=ALPHA)
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.patchset.unmatched) == ("kohya", {})
    got = lora_compat.patched_weights(path, {"transformer": model}, 0.8)
    _assert_matches(got, _diffusers_fused(model, path, 0.8), model)


@pytest.mark.parametrize("layout", ["comfy", "kohya"])
def test_down_up_alpha_files_with_modulation_equal_the_independent_delta(model, tmp_path, layout):
    """ComfyUI ``diffusion_model.`` + ``lora_down``/``lora_up`` + ``alpha`` (diffusers drops the whole file) and
    kohya files with the shared modulation layers and the final adaLN (diffusers drops those keys)."""
    modules = _bfl_modules(model)
    lora = _random_lora(modules, 4)
    path = _save_bfl(lora, tmp_path / f"flux2_{layout}.safetensors", kohya_names=layout == "kohya", down_up=True,
                     alpha=ALPHA)
    detection = lora_compat.detect(path)
    assert detection.patchset.unmatched == {} and detection.base_candidates == ["flux2"]
    got = lora_compat.patched_weights(path, {"transformer": model}, 0.9)
    _assert_matches(got, _expected(model, modules, lora, 0.9 * ALPHA / RANK), model)


def test_lokr_on_fused_qkv_equals_the_independent_delta(model, tmp_path):
    """ai-toolkit LoKr on ``double_blocks.0.img_attn.qkv`` and ``single_blocks.1.linear1``: the Kronecker delta of
    the whole fused module (LyCORIS: ``alpha / rank`` with a low-rank ``w2``), its rows split into q, k, v."""
    modules = _bfl_modules(model)
    g = torch.Generator().manual_seed(5)
    tensors, expected = {}, {}
    params = dict(model.named_parameters())
    for bfl in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1"):
        parts, rows, cols = modules[bfl]
        w1 = torch.randn(4, 2, generator=g)
        w2_a, w2_b = torch.randn(rows // 4, 2, generator=g), torch.randn(2, cols // 2, generator=g)
        key = f"diffusion_model.{bfl}"
        tensors.update({f"{key}.lokr_w1": w1, f"{key}.lokr_w2_a": w2_a, f"{key}.lokr_w2_b": w2_b,
                        f"{key}.alpha": torch.tensor(1.0)})
        delta = torch.kron(w1, w2_a @ w2_b) * (1.0 / 2)
        for part, chunk in zip(parts, delta.chunk(len(parts))):
            expected[f"transformer.{part}.weight"] = params[f"{part}.weight"].detach() + chunk
    path = tmp_path / "flux2_lokr.safetensors"
    save_file(tensors, str(path))
    got = lora_compat.patched_weights(path, {"transformer": model})
    _assert_matches(got, expected, model)


def test_patcher_on_the_bare_transformer_restores(model, tmp_path):
    modules = _bfl_modules(model)
    lora = _random_lora(modules, 6)
    path = _save_bfl(lora, tmp_path / "flux2_patcher.safetensors", down_up=True, alpha=ALPHA)
    live = copy.deepcopy(model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    patcher = lora_compat.Patcher(live)  # the component comes from the family's class name
    patcher.set([(path, 0.5)])
    _assert_matches({f"transformer.{k}": v for k, v in live.state_dict().items() if not torch.equal(v, before[k])},
                    _expected(model, modules, lora, 0.5 * ALPHA / RANK), model)
    patcher.set([])
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())


def _partial_diffusers_file(model, path: Path) -> Path:
    """Only ``to_q`` and ``to_v`` of block 0 (no ``to_k``), ``add_k_proj`` of block 1 and a single block's fused
    ``to_qkv_mlp_proj``: the parts of a fused BFL qkv are assembled block-diagonally."""
    g = torch.Generator().manual_seed(8)
    tensors = {}
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
                 "transformer_blocks.1.attn.add_k_proj", "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                 "norm_out.linear"):
        out, inp = shapes[name]
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, inp, generator=g) * 0.3
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out, RANK, generator=g) * 0.3
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("chain", [("bfl", "diffusers"), ("kohya", "bfl"), ("diffusers", "kohya", "diffusers")])
def test_convert_round_trips_stay_exact(model, tmp_path, chain):
    source = _partial_diffusers_file(model, tmp_path / "partial.safetensors")
    expected = _diffusers_fused(model, source)
    for step, target in enumerate(chain):
        out = tmp_path / f"step{step}_{target}.safetensors"
        lora_compat.convert(source, target, out, base="flux2")
        source = out
        keys = set(load_file(str(out)))
        if target == "bfl":
            assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in keys
            assert "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight" in keys
        if target == "kohya":
            assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight" in keys
    _assert_matches(lora_compat.patched_weights(source, {"transformer": model}), expected, model)


def test_bfl_file_has_the_block_diagonal_qkv(model, tmp_path):
    """q and v without k: one fused LoRA of rank 2 x RANK whose k rows are zero."""
    source = _partial_diffusers_file(model, tmp_path / "partial.safetensors")
    out = tmp_path / "partial_bfl.safetensors"
    lora_compat.convert(source, "bfl", out, base="flux2")
    tensors = load_file(str(out))
    up = tensors["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
    assert up.shape == (3 * WIDTH, 2 * RANK)
    assert torch.count_nonzero(up[WIDTH:2 * WIDTH]) == 0


def test_text_encoder_keys_apply_where_the_host_has_the_encoder(model, tmp_path):
    """A Klein-style file with a Qwen3 encoder LoRA (``lora_te_``): applied to a tiny ``Qwen3ForCausalLM`` given as
    ``text_encoder``, listed unmatched when the host has no encoder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=32)).eval()
    modules = {k: v for k, v in _bfl_modules(model).items() if k.startswith("double_blocks.0.img")}
    lora = _random_lora(modules, 9)
    path = _save_bfl(lora, tmp_path / "te.safetensors", kohya_names=True, down_up=True, alpha=ALPHA)
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(10)
    down, up = torch.randn(RANK, 16, generator=g), torch.randn(16, RANK, generator=g)
    tensors.update({"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": down,
                    "lora_te_model_layers_0_self_attn_q_proj.lora_up.weight": up,
                    "lora_te_model_layers_0_self_attn_q_proj.alpha": torch.tensor(ALPHA)})
    save_file(tensors, str(path))
    got = lora_compat.patched_weights(path, {"transformer": model, "text_encoder": encoder})
    want = encoder.model.layers[0].self_attn.q_proj.weight.detach() + ALPHA / RANK * up @ down
    assert (got["text_encoder.model.layers.0.self_attn.q_proj.weight"] - want).abs().max() < 1e-6
    from lora_compat.archs import ModuleIndex
    from lora_compat.models import resolve_patchset

    patchset = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert sorted(patchset.unmatched) == sorted(k for k in tensors if k.startswith("lora_te_"))


def test_diffusers_adapter_on_a_klein_pipeline(tmp_path):
    """``adapters.diffusers.load`` of a ComfyUI-named file into a ``Flux2KleinPipeline``: the output equals the
    independently fused model; ``set_strength`` and ``unload`` are exact."""
    from lora_compat.adapters import diffusers as adapter

    model = _model(11)
    modules = _bfl_modules(model)
    lora = _random_lora(modules, 12)
    path = _save_bfl(lora, tmp_path / "klein.safetensors", down_up=True, alpha=ALPHA)
    reference = copy.deepcopy(model)
    fused = _expected(model, modules, lora, 0.8 * ALPHA / RANK)
    reference.load_state_dict({**reference.state_dict(),
                               **{k.removeprefix("transformer."): v for k, v in fused.items()}})
    pipe = diffusers.Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                        transformer=copy.deepcopy(model))
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(6, 4)
    ids[:, 1] = torch.arange(6)
    inputs = dict(hidden_states=torch.randn(1, 6, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 3, 12, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(3, 4), guidance=torch.tensor([3.5]),
                  return_dict=False)

    def run(transformer):
        with torch.no_grad():
            return transformer(**inputs)[0]

    before = run(pipe.transformer)
    loaded = adapter.load(pipe, path, strength=0.8)
    want = run(reference)
    at_08 = run(pipe.transformer)
    assert (at_08 - want).norm() / want.norm() < 1e-5
    adapter.set_strength(pipe, loaded, 0.3)
    assert not torch.equal(run(pipe.transformer), at_08)
    adapter.set_strength(pipe, loaded, 0.8)
    assert torch.equal(run(pipe.transformer), at_08)
    adapter.unload(pipe, loaded)
    assert torch.equal(run(pipe.transformer), before)


def _bfl_state_dict(model) -> dict[str, torch.Tensor]:
    """The model under its BFL names (diffusers' checkpoint converter read backwards: q, k, v stacked into qkv,
    ``norm_out.linear`` 's halves swapped back, RMSNorm weights as ``scale``)."""
    params = {k: v.detach() for k, v in model.state_dict().items()}
    out = {}
    for bfl, (parts, _, _) in _bfl_modules(model).items():
        weight = torch.cat([params[f"{p}.weight"] for p in parts])
        if bfl == FINAL_MOD[0]:
            scl, shift = weight.chunk(2)
            weight = torch.cat([shift, scl])
        out[f"{bfl}.weight"] = weight.contiguous()
    for i in range(TINY["num_layers"]):
        for s, (q, k) in (("img", ("norm_q", "norm_k")), ("txt", ("norm_added_q", "norm_added_k"))):
            out[f"double_blocks.{i}.{s}_attn.norm.query_norm.scale"] = params[f"transformer_blocks.{i}.attn.{q}.weight"]
            out[f"double_blocks.{i}.{s}_attn.norm.key_norm.scale"] = params[f"transformer_blocks.{i}.attn.{k}.weight"]
    for i in range(TINY["num_single_layers"]):
        out[f"single_blocks.{i}.norm.query_norm.scale"] = params[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = params[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    for name in ("guidance_in.in_layer", "guidance_in.out_layer"):
        part = name.replace("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1") \
            .replace("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2")
        out[f"{name}.weight"] = params[f"{part}.weight"]
    assert len(out) == len(params) - 4 * TINY["num_layers"]  # every parameter, once (six q/k/v in two qkv)
    return out


def _bfl_expected(bfl_weights, lora, scale: float) -> dict[str, torch.Tensor]:
    """In BFL space a BFL LoRA is a plain sum: ``W + scale · up @ down`` on each module."""
    return {f"{name}.weight": bfl_weights[f"{name}.weight"] + scale * (up @ down) for name, (down, up) in lora.items()}


def test_comfy_names_are_bfl_names_with_the_rows(model, tmp_path):
    """``convert_for_host(..., "comfy")`` against a ComfyUI-held FLUX.2 model (BFL state dict): the names are
    ``lora_unet_<BFL name>``, the file's parts assembled into the fused modules, and applying them as ComfyUI does
    (``W + alpha/rank · up @ down``) gives the BFL weights of diffusers' fused model."""
    from lora_compat.hosts.convert import convert_for_host, index_from_state_dict

    source = _partial_diffusers_file(model, tmp_path / "partial.safetensors")
    fused = _diffusers_fused(model, source)
    fused_model = copy.deepcopy(model)
    fused_model.load_state_dict({k.removeprefix("transformer."): v for k, v in fused.items()})
    want = _bfl_state_dict(fused_model)
    host = _bfl_state_dict(model)
    index = index_from_state_dict({f"diffusion_model.{k}": tuple(v.shape) for k, v in host.items()})
    conversion = convert_for_host(str(source), "comfy", index)
    assert sorted(conversion.patches) == ["lora_unet_double_blocks_0_img_attn_qkv",
                                          "lora_unet_double_blocks_1_txt_attn_qkv",
                                          "lora_unet_final_layer_adaLN_modulation_1",
                                          "lora_unet_single_blocks_0_linear1"]
    # the swapped final adaLN has no host-native tensors (as for FLUX.1): the node applies lora_compat's own patch
    modules = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                      for k in conversion.tensors})
    assert modules == sorted(set(conversion.patches) - {"lora_unet_final_layer_adaLN_modulation_1"})
    changed = {"final_layer.adaLN_modulation.1.weight"}
    for module in modules:
        t = conversion.tensors
        down, up = t[f"{module}.lora_down.weight"], t[f"{module}.lora_up.weight"]
        scale = float(t[f"{module}.alpha"]) / down.shape[0] if f"{module}.alpha" in t else 1.0
        name = {"lora_unet_double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv",
                "lora_unet_double_blocks_1_txt_attn_qkv": "double_blocks.1.txt_attn.qkv",
                "lora_unet_final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
                "lora_unet_single_blocks_0_linear1": "single_blocks.0.linear1"}[module]
        got = host[f"{name}.weight"] + scale * (up @ down)
        assert (got - want[f"{name}.weight"]).norm() / (want[f"{name}.weight"] - host[f"{name}.weight"]).norm() < 1e-5
        changed.add(f"{name}.weight")
    assert changed == {k for k in want if not torch.equal(want[k], host[k])}


def test_bake_a_single_file_bfl_checkpoint(model, tmp_path):
    """A ComfyUI-style single file (BFL names) baked with a ComfyUI LoRA: each module is the plain BFL sum."""
    from lora_compat.tools.bake import bake

    host = _bfl_state_dict(model)
    save_file({f"model.diffusion_model.{k}": v for k, v in host.items()}, str(tmp_path / "flux2.safetensors"))
    lora = _random_lora(_bfl_modules(model), 13)
    path = _save_bfl(lora, tmp_path / "lora.safetensors", down_up=True, alpha=ALPHA)
    report = bake(tmp_path / "flux2.safetensors", [(path, 0.6)], tmp_path / "baked.safetensors", progress=False)
    assert report.patched > 0
    baked = load_file(str(tmp_path / "baked.safetensors"))
    want = {**host, **_bfl_expected(host, lora, 0.6 * ALPHA / RANK)}
    assert sorted(baked) == sorted(f"model.diffusion_model.{k}" for k in want)
    for key, value in want.items():
        got = baked[f"model.diffusion_model.{key}"]
        assert (got - value).abs().max() <= 1e-5 * value.abs().max(), key


def test_bake_a_diffusers_folder(model, tmp_path):
    from lora_compat.tools.bake import bake

    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint / "transformer")
    (checkpoint / "model_index.json").write_text("{}")
    modules = _bfl_modules(model)
    lora = _random_lora(modules, 14)
    path = _save_bfl(lora, tmp_path / "lora.safetensors", kohya_names=True, down_up=True, alpha=ALPHA)
    bake(checkpoint, [(path, 1.0)], tmp_path / "baked", progress=False)
    baked = diffusers.Flux2Transformer2DModel.from_pretrained(tmp_path / "baked" / "transformer")
    got = {f"transformer.{k}": v for k, v in baked.state_dict().items()
           if not torch.equal(v, model.state_dict()[k])}
    _assert_matches(got, _expected(model, modules, lora, ALPHA / RANK), model)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_simpletuner_lycoris_matches_lycoris_forward(model, tmp_path, algo):
    """SimpleTuner's ``lycoris_<diffusers name>`` LoKr/LoHa (lycoris-lora over every Linear of the tiny
    ``Flux2Transformer2DModel``, saved by lycoris' ``save_weights``): the weights lycoris' own forward implies, at
    multiplier and strength 0.6; the Patcher sets them and restores every weight bit for bit."""
    pytest.importorskip("lycoris")
    from test_flux_parity import _expected_from_implied, assert_same, write_lycoris

    path, implied = write_lycoris(tmp_path / f"{algo}.safetensors", model, algo, multiplier=0.6)
    assert len(implied) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert any(k.startswith("lycoris_transformer_blocks_0_attn_to_q.") for k in load_file(str(path)))
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.base_candidates, detection.patchset.unmatched) == \
        ("lycoris", ["flux2"], {})
    expected = _expected_from_implied(model, implied)
    assert_same(lora_compat.patched_weights(path, {"transformer": model}, 0.6, strict=True), expected)
    assert_patcher_matches(model, path, 0.6, {f"transformer.{k}": v for k, v in expected.items()})
