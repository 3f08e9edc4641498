"""``bake``: LoRAs merged into a checkpoint equal the patcher's result bit for bit; streamed."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat.tools.bake import bake
from lora_compat.cli import main

from lora_compat.oracles.lycoris_oracle import write_lycoris_file
from lora_compat.oracles.models import make_sd15_components
from sd_checkpoints import single_file_names, single_file_tensors
from flux_models import kohya_flux_file, make_bfl_host, make_flux

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)


def _loras(tmp_path: Path, components: dict) -> list[tuple[Path, float]]:
    loras = []
    for variant, strength in (("loha", 0.7), ("lora", -0.4)):
        (tmp_path / variant).mkdir()
        loras.append((write_lycoris_file(tmp_path / variant, components, variant, seed=3)[0], strength))
    return loras


def _expected(components: dict, loras) -> dict[str, torch.nn.Module]:
    copies = {k: copy.deepcopy(m) for k, m in components.items()}
    lora_compat.Patcher(copies).set(loras)
    return copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bake_a_diffusers_folder(tmp_path: Path, dtype) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    components = make_sd15_components(seed=100, dtype=dtype)
    checkpoint = tmp_path / "checkpoint"
    components["unet"].save_pretrained(checkpoint / "unet")
    components["text_encoder"].save_pretrained(checkpoint / "text_encoder")
    (checkpoint / "model_index.json").write_text("{}")
    loras = _loras(tmp_path, components)
    report = bake(checkpoint, loras, tmp_path / "baked", progress=False)
    assert report.patched > 0 and (tmp_path / "baked" / "model_index.json").is_file()
    want = _expected(components, loras)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "baked" / "unet", torch_dtype=dtype)
    te = CLIPTextModel.from_pretrained(tmp_path / "baked" / "text_encoder", torch_dtype=dtype)
    for name, module in (("unet", unet), ("text_encoder", te)):
        expected = dict(want[name].named_parameters())
        for key, value in module.named_parameters():
            assert torch.equal(value, expected[key]), (name, key)


@pytest.mark.parametrize("make", ["sd15", "sdxl"])
def test_single_file_names_are_the_ones_diffusers_converts(make: str) -> None:
    """The SGM names the single-file tests write are read back by diffusers' own LDM converter onto every
    UNet parameter, value for value (an oracle for ``sgm_aliases`` independent of lora_compat)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lora_compat.oracles.models import make_sdxl_components

    components = (make_sd15_components if make == "sd15" else make_sdxl_components)(seed=100)
    components = {"unet": components["unet"], "text_encoder": components["text_encoder"]}
    tensors = single_file_tensors(components)
    unet = components["unet"]
    converted = convert_ldm_unet_checkpoint(
        {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}, dict(unet.config))
    state = unet.state_dict()
    assert converted.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(converted[key], value), key


def test_bake_a_single_file_sd_checkpoint(tmp_path: Path) -> None:
    """SGM names under model.diffusion_model., CLIP under cond_stage_model.transformer.text_model."""
    components = make_sd15_components(seed=100)
    names = single_file_names(components)
    params = {f"{c}.{n}": p.detach() for c, m in components.items() for n, p in m.named_parameters()}
    save_file({names[k]: v.contiguous() for k, v in params.items() if k in names},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loras = _loras(tmp_path, components)
    bake(tmp_path / "model.safetensors", loras, tmp_path / "baked.safetensors", progress=False)
    baked = load_file(str(tmp_path / "baked.safetensors"))
    want = _expected(components, loras)
    expected = {f"{c}.{n}": p.detach() for c, m in want.items() for n, p in m.named_parameters()}
    assert baked.keys() == {names[k] for k in params if k in names}
    for key, name in names.items():
        assert torch.equal(baked[name], expected[key]), key


def test_bake_a_single_file_flux_checkpoint_with_fused_layers(tmp_path: Path) -> None:
    model = make_flux()
    host = make_bfl_host(model)
    save_file({k: v.detach().contiguous() for k, v in host.state_dict().items()}, str(tmp_path / "flux.safetensors"))
    lora = kohya_flux_file(tmp_path / "lora.safetensors", model)
    bake(tmp_path / "flux.safetensors", [(lora, 0.8)], tmp_path / "baked.safetensors", progress=False)
    expected = make_bfl_host(model)
    lora_compat.Patcher({"transformer": expected}).set([(lora, 0.8)])
    baked = load_file(str(tmp_path / "baked.safetensors"))
    for key, value in expected.state_dict().items():
        assert torch.equal(baked[key], value), key


def test_cli_bake_and_refusals(tmp_path: Path, capsys) -> None:
    components = make_sd15_components(seed=100)
    checkpoint = tmp_path / "checkpoint"
    components["unet"].save_pretrained(checkpoint / "unet")
    (lora, _), = _loras(tmp_path, components)[:1]
    assert main(["bake", str(checkpoint), f"{lora}:0.5", "-o", str(tmp_path / "out")]) == 0
    assert "tensors patched by 1 LoRA(s)" in capsys.readouterr().out
    assert main(["bake", str(checkpoint), str(lora), "-o", str(checkpoint)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["bake", str(tmp_path / "nope"), str(lora), "-o", str(tmp_path / "x")]) == 2


def test_bake_streams(tmp_path: Path) -> None:
    """Baking a 256 MB checkpoint (a LoRA on every module) adds under 1.3x its size to the peak RSS of a
    fresh process, and the output has the checkpoint's size."""
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "unet").mkdir(parents=True)
    tensors = {f"blocks.{i}.proj.weight": torch.randn(2048, 2048) for i in range(16)}
    save_file(tensors, str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))
    lora = {}
    for i in range(16):
        lora[f"unet.blocks.{i}.proj.lora_A.weight"] = torch.randn(4, 2048)
        lora[f"unet.blocks.{i}.proj.lora_B.weight"] = torch.randn(2048, 4)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    size = (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    del tensors, lora
    script = f"""
import json, warnings
warnings.filterwarnings("ignore")
def peak():  # VmHWM: ru_maxrss would carry the parent's peak across exec
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

from lora_compat.tools.bake import bake
before = peak()
bake({str(checkpoint)!r}, [({str(tmp_path / 'lora.safetensors')!r}, 1.0)], {str(tmp_path / 'out')!r}, progress=False)
after = peak()
print(json.dumps({{"added": after - before}}))
"""
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    added = __import__("json").loads(out.stdout.strip().splitlines()[-1])["added"]
    assert added < 1.3 * size, (added, size)
    baked = tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"
    assert baked.stat().st_size == size


def test_bake_reads_sgm_named_loras(tmp_path: Path) -> None:
    """A LoRA under SGM names (A1111's, sd-scripts' SDXL layout) bakes like the diffusers-named file it came from:
    the checkpoint's index reads names as the family it looks like does (its alias names)."""
    components = make_sd15_components(seed=100)
    save_file(single_file_tensors(components), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "lora").mkdir()
    source, _ = write_lycoris_file(tmp_path / "lora", components, "lora", seed=3)
    lora_compat.convert(source, "webui", tmp_path / "sgm.safetensors")
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(str(tmp_path / "sgm.safetensors")))
    report = bake(tmp_path / "model.safetensors", [(tmp_path / "sgm.safetensors", 0.8)],
                  tmp_path / "baked.safetensors", progress=False)
    assert report.unmatched == {}
    baked = load_file(str(tmp_path / "baked.safetensors"))
    want = _expected(components, [(source, 0.8)])
    expected = {f"{c}.{n}": p.detach() for c, m in want.items() for n, p in m.named_parameters()}
    for key, name in single_file_names(components).items():
        assert torch.equal(baked[name], expected[key]), key
