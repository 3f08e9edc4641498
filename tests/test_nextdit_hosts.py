"""Z-Image and Lumina 2 in the hosts: ``adapters.diffusers.load`` on tiny ``ZImagePipeline`` / ``Lumina2Pipeline``
(output equal to diffusers' fused model, ``set_strength``, ``unload`` bit-exact), the ComfyUI names (ComfyUI runs
NextDiT under its native names: ``qkv`` fused, written block-diagonal) applied to a native-layout model exactly, and
``bake`` into a diffusers folder and a ComfyUI single file."""
from __future__ import annotations

import copy

import pytest
import torch

import lora_compat

from nextdit_names import native
from test_nextdit import CLASSES, family  # noqa: F401  (family: the fixture)

diffusers = pytest.importorskip("diffusers")


def run(base: str, transformer: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if base == "z-image":
            out = transformer([torch.randn(4, 1, 4, 4, generator=g)], torch.tensor([0.5]),
                              [torch.randn(8, 16, generator=g)], return_dict=False)[0]
            return torch.stack(out)
        return transformer(torch.randn(1, 4, 4, 4, generator=g), torch.tensor([0.5]), torch.randn(1, 8, 16, generator=g),
                           torch.ones(1, 8, dtype=torch.bool), return_dict=False)[0]


def with_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    reference = copy.deepcopy(model)
    reference.load_state_dict({k.removeprefix("transformer."): v for k, v in weights.items()})
    return reference


@pytest.mark.parametrize("layout", ["native", "musubi", "diffusers"])
def test_diffusers_adapter_on_the_pipeline(family, layout):
    from lora_compat.adapters import diffusers as adapter

    base, model, files, expected, _ = family
    pipe = getattr(diffusers, CLASSES[base][1])(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                                transformer=copy.deepcopy(model))
    before = run(base, pipe.transformer)
    loaded = adapter.load(pipe, files[layout], strength=0.6)
    assert loaded.unmatched == []
    for strength in (0.6, 1.0):
        if strength != 0.6:
            adapter.set_strength(pipe, loaded, strength)
        want = run(base, with_weights(model, expected[strength]))
        assert (run(base, pipe.transformer) - want).norm() / (want - before).norm() < 1e-5
    adapter.unload(pipe, loaded)
    assert torch.equal(run(base, pipe.transformer), before)


def native_host(base: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as ComfyUI holds them (``diffusion_model.<native name>``): q, k and v concatenated into
    ``qkv`` (diffusers' single-file converters read backwards, by hand)."""
    state = model.state_dict()
    host: dict[str, torch.Tensor] = {}
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in sorted(linear):
        for param in ("weight", "bias"):
            if f"{name}.{param}" not in state:
                continue
            key = f"diffusion_model.{native(base, name)}.{param}"
            if key.endswith(".qkv.weight"):
                if name.endswith("to_q"):
                    parts = [state[f"{name[:-4]}{p}.weight"] for p in ("to_q", "to_k", "to_v")]
                    host[key] = torch.cat(parts)
            else:
                host[key] = state[f"{name}.{param}"]
    return host


def test_comfyui_names_apply_to_the_native_model(family):
    """``convert_for_host(..., "comfy")`` against a native host's own modules: every name is one ComfyUI's generic
    key map takes (``lora_unet_<native name, flattened>`` of a ``diffusion_model.`` weight), ``qkv`` is one fused LoRA,
    and ``W + up·down`` over the host's weights equals diffusers' fused model, re-fused by hand."""
    from lora_compat.hosts.convert import convert_for_host, index_from_state_dict

    base, model, files, expected, _ = family
    host = native_host(base, model)
    index = index_from_state_dict({k: tuple(v.shape) for k, v in host.items()})
    assert index is not None
    conversion = convert_for_host(str(files["native-kohya"]), "comfy", index=index)
    assert conversion.unmatched == []
    comfy_keys = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k
                  for k in host if k.endswith(".weight")}
    modules = {k.rpartition(".")[0] for k in conversion.tensors if not k.endswith(".alpha")}
    modules = {m.rpartition(".")[0] if m.endswith((".lora_down", ".lora_up")) else m for m in modules}
    assert modules <= set(comfy_keys) and any(m.endswith("attention_qkv") for m in modules)
    want = native_host(base, with_weights(model, expected[1.0]))
    for module in modules:
        t = conversion.tensors
        down, up = t[f"{module}.lora_down.weight"].float(), t[f"{module}.lora_up.weight"].float()
        scale = float(t[f"{module}.alpha"]) / down.shape[0] if f"{module}.alpha" in t else 1.0
        key = comfy_keys[module]
        got = host[key] + scale * (up @ down)
        assert (got - want[key]).norm() / (want[key] - host[key]).norm() < 1e-5, module


@pytest.mark.parametrize("base, comfy_class", [("z-image", "ZImage"), ("lumina2", "Lumina2")])
def test_the_comfyui_model_class_names_the_base(base, comfy_class):
    assert comfy_class in lora_compat.plugins.archs()[base].comfy_classes


def _close(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> bool:
    return torch.equal(got, want) or float((got - want).norm() / (want - base).norm()) < 1e-5


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_bake_a_comfyui_single_file(family, tmp_path, prefix):
    """A ComfyUI checkpoint (native names, fused ``qkv``; under ``model.diffusion_model.`` or bare as in
    ``diffusion_models/``) baked with a split (musubi) file: equal to diffusers' fused model, re-fused by hand."""
    from safetensors.torch import load_file, save_file

    from lora_compat.tools.bake import bake

    base, model, files, expected, _ = family
    host = {prefix + k.removeprefix("diffusion_model."): v.contiguous()
            for k, v in native_host(base, model).items()}
    save_file(host, str(tmp_path / "model.safetensors"))
    bake(tmp_path / "model.safetensors", [(files["musubi"], 0.6)], tmp_path / "baked.safetensors", progress=False)
    baked = load_file(str(tmp_path / "baked.safetensors"))
    want = {prefix + k.removeprefix("diffusion_model."): v
            for k, v in native_host(base, with_weights(model, expected[0.6])).items()}
    assert sorted(baked) == sorted(host)
    assert all(_close(baked[k], want[k], host[k]) for k in host)
    assert any(not torch.equal(baked[k], host[k]) for k in host if k.endswith("attention.qkv.weight"))


def test_bake_a_diffusers_folder(family, tmp_path):
    from lora_compat.tools.bake import bake

    base, model, files, expected, _ = family
    model.save_pretrained(tmp_path / "checkpoint" / "transformer")
    (tmp_path / "checkpoint" / "model_index.json").write_text("{}")
    bake(tmp_path / "checkpoint", [(files["native"], 1.0)], tmp_path / "baked", progress=False)
    baked = getattr(diffusers, CLASSES[base][0]).from_pretrained(tmp_path / "baked" / "transformer").state_dict()
    before = model.state_dict()
    for key, value in before.items():
        assert _close(baked[key], expected[1.0][f"transformer.{key}"], value), key


def tiny_encoder(base: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(3)
    if base == "z-image":
        config = transformers.Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        return transformers.Qwen3Model(config).eval()
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    return transformers.Gemma2Model(config).eval()


@pytest.mark.parametrize("naming", ["kohya", "comfyui"])
def test_text_encoder_keys_apply_where_the_host_has_the_encoder(family, tmp_path, naming):
    """Text-encoder LoRA keys (sd-scripts' ``lora_te_`` or ComfyUI's ``text_encoders.<model>.transformer.model.``)
    beside the transformer's: applied to the encoder exactly (``W + alpha/r · up·down`` by hand); listed unmatched,
    never dropped, when the host has no encoder; the diffusers adapter applies them on a pipeline that has one."""
    from safetensors.torch import load_file, save_file

    base, model, files, expected, _ = family
    encoder = tiny_encoder(base)
    g = torch.Generator().manual_seed(4)
    comfy = {"z-image": "text_encoders.qwen3_4b.transformer.model.", "lumina2": "text_encoders.gemma2_2b.transformer.model."}
    tensors = dict(load_file(str(files["native-kohya" if naming == "comfyui" else "kohya-fused"])))
    want = {}
    for path in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        weight = encoder.get_submodule(path).weight
        down, up = torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2, generator=g)
        key = comfy[base] + path if naming == "comfyui" else "lora_te_" + path.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)})
        want[f"text_encoder.{path}.weight"] = weight + 0.6 * 0.5 * (up @ down)
    path = tmp_path / "with_te.safetensors"
    save_file(tensors, str(path))
    got = lora_compat.patched_weights(path, {"transformer": model, "text_encoder": encoder}, 0.6)
    for key, value in want.items():
        assert torch.allclose(got.pop(key), value, atol=1e-6), key
    assert all(k.startswith("transformer.") for k in got)
    te_keys = sorted(k for k in tensors if not k.startswith(("diffusion_model.", "lora_unet_")))
    patchset = lora_compat.models.resolve_patchset(path, lora_compat.archs.ModuleIndex.from_modules(
        {"transformer": model}))
    assert sorted(patchset.unmatched) == te_keys

    from lora_compat.adapters import diffusers as adapter

    pipe = getattr(diffusers, CLASSES[base][1])(scheduler=None, vae=None, text_encoder=copy.deepcopy(encoder),
                                                tokenizer=None, transformer=copy.deepcopy(model))
    loaded = adapter.load(pipe, path, strength=0.6)
    # diffusers' Z-Image / Lumina 2 loaders take the transformer only: the file goes to lora_compat's patcher
    assert (loaded.route, loaded.unmatched) == ("patcher", [])
    for key, value in want.items():
        module = pipe.text_encoder.get_submodule(key.removeprefix("text_encoder.").removesuffix(".weight"))
        ids = torch.eye(module.in_features)
        with torch.no_grad():
            assert torch.allclose(module(ids).T, value, atol=1e-5), key
