"""ControlNet, Control-LoRA and T2I-Adapter checkpoints → diffusers. The original layouts are written by the
test's own mapping (from dialects.md §6), independently of lora_compat.tools.controlnet."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_compat.tools import controlnet
from lora_compat.cli import main

from corpus import load
from lora_compat.oracles.models import make_sd15_components

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def diffusers_to_ldm(key: str, hint_blocks: int) -> str:
    """The test's own diffusers ControlNetModel → original cldm name (layers_per_block = 2)."""
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "controlnet_mid_block.": "middle_block_out.0.",
             "controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
             "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (hint_blocks + 1)}."}
    for head, ldm in fixed.items():
        if key.startswith(head):
            return ldm + key[len(head):]
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
        return f"input_hint_block.{2 * (int(m.group(1)) + 1)}.{m.group(2)}"
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(\w+)\.(.+)", key):
        block, kind, j, head, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4), m.group(5)
        if kind == "resnets":
            return f"input_blocks.{3 * block + j + 1}.0.{RESNET.get(head, head)}.{rest}"
        return f"input_blocks.{3 * block + j + 1}.1.{head}.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{3 * (int(m.group(1)) + 1)}.0.op.{m.group(2)}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(\w+)\.(.+)", key):
        return f"middle_block.{2 * int(m.group(1))}.{RESNET.get(m.group(2), m.group(2))}.{m.group(3)}"
    if key.startswith("mid_block.attentions.0."):
        return "middle_block.1." + key[len("mid_block.attentions.0."):]
    raise AssertionError(key)


def tiny_controlnet(unet: torch.nn.Module, seed: int = 0):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8), conditioning_channels=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_original_controlnet_round_trip_is_tensor_identical(tmp_path: Path, prefix: str) -> None:
    unet = make_sd15_components(seed=1)["unet"]
    model = tiny_controlnet(unet)
    hint_blocks = len(model.controlnet_cond_embedding.blocks)
    original = {prefix + diffusers_to_ldm(k, hint_blocks): v for k, v in model.state_dict().items()}
    save_file(original, str(tmp_path / "control.safetensors"))
    back = controlnet.to_diffusers(tmp_path / "control.safetensors", base_unet=unet)
    theirs, ours = model.state_dict(), back.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_control_lora_builds_the_controlnet_from_the_base_unet(tmp_path: Path) -> None:
    unet = make_sd15_components(seed=2)["unet"]
    target = tiny_controlnet(unet, seed=3)
    base = unet.state_dict()
    hint_blocks = len(target.controlnet_cond_embedding.blocks)
    g = torch.Generator().manual_seed(4)
    tensors, expected = {"lora_controlnet": torch.tensor([])}, {}
    for key, value in target.state_dict().items():
        ldm = diffusers_to_ldm(key, hint_blocks)
        if key in base and value.dim() >= 2:
            rank = 2
            down = torch.randn(rank, *value.shape[1:], generator=g)
            up = torch.randn(value.shape[0], rank, *([1] * (value.dim() - 2)), generator=g)
            layer = ldm[: -len(".weight")]
            tensors[f"{layer}.down"], tensors[f"{layer}.up"] = down, up
            expected[key] = base[key] + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
        else:
            tensors[ldm] = value
            expected[key] = value
    save_file(tensors, str(tmp_path / "control-lora.safetensors"))
    with pytest.raises(Exception, match="base_unet"):
        controlnet.to_diffusers(tmp_path / "control-lora.safetensors")
    built = controlnet.to_diffusers(tmp_path / "control-lora.safetensors", base_unet=unet).state_dict()
    assert built.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.allclose(built[key], value, rtol=1e-6, atol=1e-6), key


def test_full_size_controlnet_and_control_lora_layouts_map_completely() -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    from lora_compat.archs.sd import OFFICIAL_CONFIGS

    ldm = {k: torch.empty(v, device="meta") for k, v in load("derived_sd15_controlnet_ldm.json")["keys"].items()}
    mapped = controlnet.controlnet_state_dict(ldm)
    diffusers = load("derived_sd15_controlnet_diffusers.json")["keys"]
    assert {k: list(v.shape) for k, v in mapped.items()} == diffusers
    recorded = load("derived_sd15_controlnet_ldm.json").get("mapping_ldm_to_diffusers") or {}
    for original, name in recorded.items():
        key = original[len("control_model."):] if original.startswith("control_model.") else original
        assert controlnet.controlnet_key(key, 14) == name, original

    with torch.device("meta"):
        sdxl = ControlNetModel.from_unet(UNet2DConditionModel(**OFFICIAL_CONFIGS["sdxl"]["unet"]),
                                         load_weights_from_unet=False)
    names = set(sdxl.state_dict())
    layout = load("derived_sdxl_control_lora_rank128.json")["keys"]
    for key in layout:
        if key == "lora_controlnet" or key.endswith(".down"):
            continue
        weight_key = key[: -len(".up")] + ".weight" if key.endswith(".up") else key
        assert controlnet.controlnet_key(weight_key, 14) in names, key


@pytest.mark.parametrize("kind", ["full_adapter", "light_adapter"])
def test_t2i_adapter_round_trip_is_tensor_identical(tmp_path: Path, kind: str) -> None:
    from diffusers import T2IAdapter

    torch.manual_seed(5)
    channels = [8, 16, 16, 16] if kind == "full_adapter" else [8, 16, 16]
    adapter = T2IAdapter(in_channels=3, channels=channels, num_res_blocks=2, downscale_factor=8, adapter_type=kind)

    def tencentarc(key: str) -> str:
        if key.startswith("adapter.conv_in."):
            return key[len("adapter."):]
        m = re.match(r"adapter\.body\.(\d+)\.(?:resnets\.(\d+)\.(block\d)|(in_conv|out_conv))\.(.+)", key)
        block, resnet, inner, conv, param = m.groups()
        if kind == "light_adapter":
            return f"body.{block}.{conv}.{param}" if conv else f"body.{block}.body.{resnet}.{inner}.{param}"
        return f"body.{2 * int(block)}.in_conv.{param}" if conv else \
            f"body.{2 * int(block) + int(resnet)}.{inner}.{param}"

    save_file({tencentarc(k): v for k, v in adapter.state_dict().items()}, str(tmp_path / "t2i.safetensors"))
    back = controlnet.t2i_adapter_to_diffusers(tmp_path / "t2i.safetensors").state_dict()
    theirs = adapter.state_dict()
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)


def test_full_size_t2i_adapter_layout_maps_completely() -> None:
    tencent = {k: torch.empty(v, device="meta") for k, v in load("derived_t2i_adapter_full_tencentarc.json")["keys"].items()}
    mapped, kind = controlnet.t2i_adapter_state_dict(tencent)
    assert kind == "full_adapter"
    assert {k: list(v.shape) for k, v in mapped.items()} == load("derived_t2i_adapter_full_diffusers.json")["keys"]


def test_cli_convert_controlnet_to_a_diffusers_folder(tmp_path: Path, capsys) -> None:
    from diffusers import T2IAdapter

    torch.manual_seed(6)
    adapter = T2IAdapter(in_channels=3, channels=[8, 16, 16, 16], num_res_blocks=2, downscale_factor=8)
    tencent = {}
    for key, value in adapter.state_dict().items():
        m = re.match(r"adapter\.body\.(\d+)\.(?:resnets\.(\d+)\.(block\d)|(in_conv))\.(.+)", key)
        if key.startswith("adapter.conv_in."):
            tencent[key[len("adapter."):]] = value
        elif m.group(4):
            tencent[f"body.{2 * int(m.group(1))}.in_conv.{m.group(5)}"] = value
        else:
            tencent[f"body.{2 * int(m.group(1)) + int(m.group(2))}.{m.group(3)}.{m.group(5)}"] = value
    save_file(tencent, str(tmp_path / "t2i.safetensors"))
    assert main(["convert", str(tmp_path / "t2i.safetensors"), "--to", "diffusers", "-o", str(tmp_path / "out")]) == 0
    assert "t2i-adapter" in capsys.readouterr().out
    loaded = T2IAdapter.from_pretrained(tmp_path / "out")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in adapter.state_dict().items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["adapter_type"] == "full_adapter"
