"""Qwen-Image: exact application of its layouts on a tiny ``QwenImageTransformer2DModel`` (random weights, no hub).

Expected weights come from diffusers (``QwenImagePipeline.load_lora_weights`` + ``fuse_lora``, whose
``_convert_non_diffusers_qwen_lora_to_diffusers`` reads the native/kohya/DiffSynth layouts), from PEFT's
``merge_and_unload``, or, for the layouts diffusers cannot load (SimpleTuner ``lycoris_``, LyCORIS LoKr, text-encoder
LoRAs), from lycoris-lora's forward pass or a computation written out in the test. Files are written by peft +
``save_lora_weights`` and renamed by the inverse of diffusers' converter (the names are Qwen-Image's own).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from family_parity import assert_matches as _assert_matches, assert_patcher_matches  # noqa: E402
from qwen_image_models import (ALPHA, RANK, TARGETS, TINY, diffusers_file, diffusers_fused,  # noqa: E402
                               renamed_file, tiny_model, tiny_text_encoder)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def files(model, tmp_path):
    path = diffusers_file(model, tmp_path / "qwen_diffusers.safetensors")
    return {"diffusers": path,
            "comfy": renamed_file(path, tmp_path / "qwen_comfy.safetensors", "diffusion_model."),
            "comfy_ab": renamed_file(path, tmp_path / "qwen_comfy_ab.safetensors", "diffusion_model.", suffixes="peft"),
            "bare": renamed_file(path, tmp_path / "qwen_bare.safetensors", ""),
            "musubi": renamed_file(path, tmp_path / "qwen_musubi.safetensors", "lora_unet_", kohya=True),
            "diffsynth": renamed_file(path, tmp_path / "qwen_diffsynth.safetensors", "", suffixes="default")}


LAYOUTS = {"diffusers": "diffusers", "comfy": "native", "comfy_ab": "native", "bare": "native", "musubi": "kohya",
           "diffsynth": "diffusers"}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_named_as_qwen_image(files, layout):
    """Tiny shapes fit no full-size base: the names alone make ``qwen-image`` the only candidate
    (test_qwen_image_mapping.py checks the full-size shapes)."""
    detection = lora_compat.detect(files[layout])
    assert (detection.dialect.id, detection.base, detection.base_candidates) == (LAYOUTS[layout], None, ["qwen-image"])
    assert not detection.patchset.unmatched
    assert sorted(detection.patchset.patches) == sorted(f"transformer.{t}" for t in TARGETS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_patched_weights_equal_diffusers(model, files, layout, strength):
    expected = diffusers_fused(model, files[layout], strength)
    got = lora_compat.patched_weights(files[layout], {"transformer": model}, strength)
    _assert_matches(got, expected, model)


def test_simpletuner_lycoris_names_equal_the_kohya_file(model, files, tmp_path):
    """SimpleTuner's ``lycoris_<name>`` (diffusers cannot load it): the same tensors as the musubi file, whose fused
    weights diffusers computes."""
    tensors = {"lycoris_" + k.removeprefix("lora_unet_"): v for k, v in load_file(str(files["musubi"])).items()}
    save_file(tensors, str(tmp_path / "qwen_lycoris.safetensors"))
    detection = lora_compat.detect(tmp_path / "qwen_lycoris.safetensors")
    assert (detection.dialect.id, detection.base_candidates, detection.patchset.unmatched) == \
        ("lycoris", ["qwen-image"], {})
    got = lora_compat.patched_weights(tmp_path / "qwen_lycoris.safetensors", {"transformer": model}, 0.7)
    _assert_matches(got, diffusers_fused(model, files["musubi"], 0.7), model)


def test_patcher_equals_diffusers_and_restores(model, files):
    assert_patcher_matches(model, files["comfy"], 0.8, diffusers_fused(model, files["comfy"], 0.8))


def test_peft_save_pretrained_equals_peft_merge(model, tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.base_candidates, detection.patchset.unmatched) == \
        ("peft", ["qwen-image"], {})
    expected = {f"transformer.{k}": v for k, v in peft_model.merge_and_unload().state_dict().items()}
    _assert_matches(lora_compat.patched_weights(path, {"transformer": model}), expected, model)


def _lokr_file(model: torch.nn.Module, path: Path, prefix: str, seed: int = 6) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LyCORIS LoKr over the tiny transformer by lycoris-lora's own ``create_lycoris`` (SimpleTuner's
    ``lycoris_`` names; ``lora_unet_`` for the kohya/musubi form, the corpus fixture's layout), and the weights its
    forward pass implies (Linear layers probed with one-hot inputs)."""
    from lycoris import LycorisNetwork

    saved = {k: getattr(LycorisNetwork, k) for k in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME",
                                                      "LORA_PREFIX", "USE_FNMATCH", "MODULE_ALGO_MAP",
                                                      "NAME_ALGO_MAP", "TARGET_EXCLUDE_NAME")}
    copy_ = copy.deepcopy(model)
    try:
        LycorisNetwork.apply_preset({"enable_conv": False, "target_module": [], "target_name": TARGETS,
                                     "module_algo_map": {}, "name_algo_map": {}, "exclude_name": []})
        network = LycorisNetwork(copy_, multiplier=1.0, lora_dim=2, alpha=1.0, network_module="lokr", factor=4)
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.loras:
            for p in lora.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    network.apply_to()
    expected = {}
    with torch.no_grad():
        for lora in network.loras:
            module = lora.org_module[0]
            eye = torch.cat([torch.zeros(1, module.in_features), torch.eye(module.in_features)])
            y = module(eye)
            name = next(n for n, m in copy_.named_modules() if m is module)
            expected[f"transformer.{name}.weight"] = (y[1:] - y[0]).T.contiguous()
    tensors = {prefix + k.removeprefix("lycoris_"): v.detach().clone() for k, v in network.state_dict().items()}
    save_file(tensors, str(path))
    return path, expected


@pytest.mark.parametrize("prefix", ["lycoris_", "lora_unet_"])
def test_lokr_equals_lycoris_forward(model, tmp_path, prefix):
    """LoKr (diffusers 0.42 raises ``ValueError`` on Qwen-Image LoKr files)."""
    path, expected = _lokr_file(model, tmp_path / "qwen_lokr.safetensors", prefix)
    assert any(k.endswith(".lokr_w1") for k in load_file(str(path)))
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.base_candidates, detection.patchset.unmatched) == \
        ("lycoris", ["qwen-image"], {})
    assert {p.kind for p in detection.patchset.patches.values()} == {"lokr"}
    got = lora_compat.patched_weights(path, {"transformer": model})
    assert sorted(got) == sorted(expected)
    for name, value in got.items():
        assert (value - expected[name]).norm() / (expected[name] - model.state_dict()[
            name.removeprefix("transformer.")]).norm() < 1e-5, name
    with pytest.raises(ValueError):
        diffusers.QwenImagePipeline.lora_state_dict(str(path))


@pytest.mark.parametrize("chain", [("diffusers", "native"), ("kohya", "diffusers"), ("native", "kohya", "native")])
def test_convert_round_trips_stay_exact(model, files, tmp_path, chain):
    expected = diffusers_fused(model, files["musubi"])
    source = files["musubi"]
    for step, target in enumerate(chain):
        out = tmp_path / f"step{step}_{target}.safetensors"
        lora_compat.convert(source, target, out, base="qwen-image")
        source = out
    keys = sorted(load_file(str(source)))
    prefix = {"native": "diffusion_model.", "kohya": "lora_unet_", "diffusers": "transformer."}[chain[-1]]
    assert all(k.startswith(prefix) for k in keys), keys[:3]
    assert f"{prefix}transformer_blocks{'.' if prefix.endswith('.') else '_'}1" in " ".join(keys)
    _assert_matches(lora_compat.patched_weights(source, {"transformer": model}), expected, model)


def test_kohya_names_are_musubis(model, files, tmp_path):
    """``convert --to kohya`` writes musubi-tuner's names (ComfyUI's generic ``lora_unet_`` map reads them)."""
    lora_compat.convert(files["diffusers"], "kohya", tmp_path / "k.safetensors", base="qwen-image")
    modules = {k.split(".")[0] for k in load_file(str(tmp_path / "k.safetensors"))}
    assert modules == {"lora_unet_" + t.replace(".", "_") for t in TARGETS}


def test_text_encoder_lora_applies_when_the_host_has_it_and_is_unmatched_otherwise(model, tmp_path):
    """Qwen2.5-VL keys (kohya ``lora_te_`` under the checkpoint's ``model.layers.N`` names, and diffusers'
    ``text_encoder.`` under transformers 5's names): W + scale * up @ down, computed here; without the encoder
    they are listed unmatched."""
    te = tiny_text_encoder()
    g = torch.Generator().manual_seed(9)
    tensors, expected = {}, {}
    modules = (("model_layers_0_self_attn_q_proj", "model.language_model.layers.0.self_attn.q_proj"),
               ("model_layers_1_mlp_down_proj", "model.language_model.layers.1.mlp.down_proj"))
    for kohya, path in modules:
        weight = te.get_submodule(path).weight
        down, up = torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2, generator=g)
        tensors.update({f"lora_te_{kohya}.lora_down.weight": down, f"lora_te_{kohya}.lora_up.weight": up,
                        f"lora_te_{kohya}.alpha": torch.tensor(1.0)})
        expected[f"text_encoder.{path}.weight"] = weight.detach() + 0.5 * (1.0 / 2) * (up @ down)
    weight = model.transformer_blocks[0].img_mod[1].weight
    down, up = torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2, generator=g)
    tensors.update({"lora_unet_transformer_blocks_0_img_mod_1.lora_down.weight": down,
                    "lora_unet_transformer_blocks_0_img_mod_1.lora_up.weight": up,
                    "lora_unet_transformer_blocks_0_img_mod_1.alpha": torch.tensor(2.0)})
    expected["transformer.transformer_blocks.0.img_mod.1.weight"] = weight.detach() + 0.5 * (up @ down)
    save_file(tensors, str(tmp_path / "qwen_te.safetensors"))
    got = lora_compat.patched_weights(tmp_path / "qwen_te.safetensors", {"transformer": model, "text_encoder": te}, 0.5)
    assert sorted(got) == sorted(expected)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    with pytest.warns(lora_compat.LoraCompatWarning, match="6 keys map to no module"):
        got = lora_compat.patched_weights(tmp_path / "qwen_te.safetensors", {"transformer": model}, 0.5)
    assert sorted(got) == ["transformer.transformer_blocks.0.img_mod.1.weight"]


def test_diffusers_adapter_on_a_qwen_image_pipeline(model, files):
    """``adapters.diffusers.load`` of a musubi-named file into a ``QwenImagePipeline``: the output equals diffusers'
    fused model, ``set_strength`` follows it, and ``unload`` restores the output bit for bit."""
    from lora_compat.adapters import diffusers as adapter

    def reference(strength):
        fused = copy.deepcopy(model)
        fused.load_state_dict({k.removeprefix("transformer."): v
                               for k, v in diffusers_fused(model, files["musubi"], strength).items()})
        return fused

    pipe = diffusers.QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                       transformer=copy.deepcopy(model))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 3, 16, generator=g), encoder_hidden_states_mask=torch.ones(1, 3),
                  timestep=torch.tensor([0.5]), img_shapes=[(1, 2, 2)], return_dict=False)

    def run(transformer):
        with torch.no_grad():
            return transformer(**inputs)[0]

    before = run(pipe.transformer)
    loaded = adapter.load(pipe, files["musubi"], strength=0.8)
    want = run(reference(0.8))
    assert (run(pipe.transformer) - want).norm() / want.norm() < 1e-5
    adapter.set_strength(pipe, loaded, 0.3)
    want = run(reference(0.3))
    assert (run(pipe.transformer) - want).norm() / want.norm() < 1e-5
    adapter.unload(pipe, loaded)
    assert torch.equal(run(pipe.transformer), before)
