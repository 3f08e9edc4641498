"""``bake`` into Qwen-Image checkpoints: a diffusers folder (``transformer/`` + ``text_encoder/``) and single files
(ComfyUI's ``model.diffusion_model.`` prefix and its bare ``diffusion_models/`` file); the baked transformer equals
diffusers' ``load_lora_weights`` + ``fuse_lora``, the text encoder a computation written out here."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat.tools.bake import bake

pytest.importorskip("diffusers")
from qwen_image_models import diffusers_file, diffusers_fused, renamed_file, tiny_model, tiny_text_encoder  # noqa: E402

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)
STRENGTH = 0.8


def _lora(tmp_path: Path, model: torch.nn.Module) -> tuple[Path, Path]:
    """The musubi-named LoRA (and the diffusers file it was renamed from, for diffusers' fused weights)."""
    source = diffusers_file(model, tmp_path / "qwen_diffusers.safetensors")
    return renamed_file(source, tmp_path / "qwen_musubi.safetensors", "lora_unet_", kohya=True), source


def _assert_transformer(baked: dict[str, torch.Tensor], prefix: str, model, source: Path) -> None:
    want = diffusers_fused(model, source, STRENGTH)
    for key, value in model.state_dict().items():
        expected = want[f"transformer.{key}"]
        if torch.equal(expected, value):
            assert torch.equal(baked[prefix + key], value), key
        else:
            err = (baked[prefix + key] - expected).norm() / (expected - value).norm()
            assert err < 1e-5, (key, float(err))


def test_bake_a_qwen_image_diffusers_folder(tmp_path: Path) -> None:
    model, encoder = tiny_model(), tiny_text_encoder()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint / "transformer")
    encoder.save_pretrained(checkpoint / "text_encoder")
    (checkpoint / "model_index.json").write_text("{}")
    lora, source = _lora(tmp_path, model)
    tensors = load_file(str(lora))
    g = torch.Generator().manual_seed(4)
    weight = encoder.model.language_model.layers[1].self_attn.v_proj.weight.detach()
    down, up = torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2, generator=g)
    tensors.update({"lora_te_model_layers_1_self_attn_v_proj.lora_down.weight": down,
                    "lora_te_model_layers_1_self_attn_v_proj.lora_up.weight": up,
                    "lora_te_model_layers_1_self_attn_v_proj.alpha": torch.tensor(2.0)})
    save_file(tensors, str(tmp_path / "with_te.safetensors"))
    report = bake(checkpoint, [(tmp_path / "with_te.safetensors", STRENGTH)], tmp_path / "baked", progress=False)
    assert report.unmatched == {}
    baked = {}
    for path in (tmp_path / "baked" / "transformer").glob("*.safetensors"):
        baked.update(load_file(str(path)))
    _assert_transformer(baked, "", model, source)
    encoder_baked, encoder_saved = {}, {}
    for path in (tmp_path / "baked" / "text_encoder").glob("*.safetensors"):
        encoder_baked.update(load_file(str(path)))
        encoder_saved.update(load_file(str(checkpoint / "text_encoder" / path.name)))
    key = next(k for k in encoder_baked if k.endswith("layers.1.self_attn.v_proj.weight"))
    torch.testing.assert_close(encoder_baked[key], weight + STRENGTH * (up @ down), rtol=1e-6, atol=1e-6)
    assert [k for k, v in encoder_baked.items() if not torch.equal(v, encoder_saved[k])] == [key]


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
def test_bake_a_qwen_image_single_file(tmp_path: Path, prefix: str) -> None:
    model = tiny_model()
    save_file({prefix + k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "qwen.safetensors"))
    lora, source = _lora(tmp_path, model)
    report = bake(tmp_path / "qwen.safetensors", [(lora, STRENGTH)], tmp_path / "baked.safetensors", progress=False)
    assert report.unmatched == {} and report.patched > 0
    _assert_transformer(load_file(str(tmp_path / "baked.safetensors")), prefix, model, source)
