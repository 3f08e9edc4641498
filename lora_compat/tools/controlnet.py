"""ControlNet, Stability Control-LoRA and T2I-Adapter checkpoints → diffusers ``ControlNetModel`` / ``T2IAdapter``.

- Original ControlNet (lllyasviel ``cldm``, ``control_model.`` prefix optional): the encoder uses the UNet's
  LDM names; ``input_hint_block`` is the conditioning embedding, ``zero_convs.N.0`` the down-block zero
  convs, ``middle_block_out.0`` the mid-block one.
- Stability Control-LoRA (``lora_controlnet`` marker): a ControlNet stored as ``<layer>.up``/``<layer>.down``
  deltas against the base UNet's weights plus full tensors for everything else; needs the base UNet.
- TencentARC T2I-Adapter (full and light) → diffusers ``T2IAdapter``.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch

from ..errors import LoraCompatError
from ..files import LoraFile

RESNET_FROM_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP_FROM_LDM = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
                "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
                "label_emb.0.2": "add_embedding.linear_2"}
_INPUT = re.compile(r"^input_blocks\.(\d+)\.(\d)\.(.+)$")
_MIDDLE = re.compile(r"^middle_block\.(\d)\.(.+)$")
_HINT = re.compile(r"^input_hint_block\.(\d+)\.(weight|bias)$")
_ZERO = re.compile(r"^zero_convs\.(\d+)\.0\.(weight|bias)$")


def _resnet(rest: str) -> str:
    for ldm, diffusers in RESNET_FROM_LDM.items():
        if rest.startswith(ldm + "."):
            return diffusers + rest[len(ldm):]
    return rest


def ldm_encoder_key(key: str, layers: int = 2) -> str | None:
    """An LDM/SGM UNet-encoder parameter name → its diffusers name (``None`` if not an encoder key)."""
    module, _, param = key.rpartition(".")
    for ldm, diffusers in TOP_FROM_LDM.items():
        if module == ldm:
            return f"{diffusers}.{param}"
    if m := _INPUT.match(key):
        k, slot, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        block, offset = divmod(k - 1, layers + 1)
        if offset == layers:  # the downsampler closing block ``block``
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[len('op.'):]}" if rest.startswith("op.") else None
        if slot == 0:
            return f"down_blocks.{block}.resnets.{offset}.{_resnet(rest)}"
        return f"down_blocks.{block}.attentions.{offset}.{rest}"
    if m := _MIDDLE.match(key):
        slot, rest = int(m.group(1)), m.group(2)
        if slot == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{slot // 2}.{_resnet(rest)}"
    return None


def controlnet_key(key: str, hint_last: int) -> str | None:
    """An original ControlNet parameter name (prefix stripped) → its diffusers ``ControlNetModel`` name."""
    if m := _HINT.match(key):
        index, param = int(m.group(1)), m.group(2)
        if index == 0:
            return f"controlnet_cond_embedding.conv_in.{param}"
        if index == hint_last:
            return f"controlnet_cond_embedding.conv_out.{param}"
        return f"controlnet_cond_embedding.blocks.{index // 2 - 1}.{param}"
    if m := _ZERO.match(key):
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    if key.startswith("middle_block_out.0."):
        return "controlnet_mid_block." + key[len("middle_block_out.0."):]
    return ldm_encoder_key(key)


def _strip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "control_model."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def _hint_last(keys) -> int:
    return max(int(m.group(1)) for k in keys if (m := _HINT.match(k)))


def controlnet_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ControlNet tensors → diffusers ``ControlNetModel`` tensors (every key mapped, or an error)."""
    state = _strip(state)
    last = _hint_last(state)
    out, unknown = {}, []
    for key, tensor in state.items():
        name = controlnet_key(key, last)
        if name is None:
            unknown.append(key)
        else:
            out[name] = tensor
    if unknown:
        raise LoraCompatError(f"{len(unknown)} ControlNet keys have no diffusers name: {', '.join(unknown[:5])}")
    return out


def _load(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if isinstance(source, Mapping):
        return dict(source), {}
    file = LoraFile.open(source)
    return {k: file.tensor(k) for k in file.keys()}, dict(file.metadata)


def _config_for(base_unet: Any, hint_channels: int, embedding: tuple[int, ...]) -> Any:
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(base_unet, conditioning_embedding_out_channels=embedding,
                                     load_weights_from_unet=False, conditioning_channels=hint_channels)


def _embedding_channels(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """``conditioning_embedding_out_channels``: the hint block's convs sit at even indices; every channel
    change happens in a stride-2 conv at an index divisible by 4 (the last conv is the zero ``conv_out``)."""
    hint = sorted((int(m.group(1)), t) for k, t in state.items() if (m := _HINT.match(k)) and m.group(2) == "weight")
    return tuple(t.shape[0] for i, t in hint[:-1] if i % 4 == 0)


def to_diffusers(source: Any, base_unet: Any = None) -> Any:
    """A diffusers ``ControlNetModel`` from an original ControlNet checkpoint or a Stability Control-LoRA
    (which needs ``base_unet``: its deltas are against the base UNet's weights).

    ``base_unet`` also gives the architecture (``ControlNetModel.from_unet``); without it the official
    SD1.5/SD2/SDXL config whose shapes fit is used."""
    state, _ = _load(source)
    state = _strip(state)
    if "lora_controlnet" in state:
        return _control_lora(state, base_unet)
    hint = state["input_hint_block.0.weight"]
    embedding = _embedding_channels(state)
    unet = base_unet if base_unet is not None else _official_unet_for(state)
    model = _config_for(unet, hint.shape[1], embedding)
    model.load_state_dict(controlnet_state_dict(state), strict=True)
    return model


def _official_unet_for(state: Mapping[str, torch.Tensor]) -> Any:
    from diffusers import UNet2DConditionModel

    from ..archs.sd import OFFICIAL_CONFIGS

    conv_in = state.get("input_blocks.0.0.weight")
    for base, configs in OFFICIAL_CONFIGS.items():
        config = configs["unet"]
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
        mapped = {ldm_encoder_key(k): tuple(v.shape) for k, v in state.items() if ldm_encoder_key(k)}
        if conv_in is not None and all(shapes.get(k) == s for k, s in mapped.items()):
            return UNet2DConditionModel(**config)
    raise LoraCompatError("the ControlNet fits no official SD1.5/SD2/SDXL UNet; pass base_unet= to give the "
                          "architecture")


def _control_lora(state: Mapping[str, torch.Tensor], base_unet: Any) -> Any:
    if base_unet is None:
        raise LoraCompatError("a Control-LoRA stores deltas against the base UNet: pass base_unet=")
    hint = state["input_hint_block.0.weight"]
    model = _config_for(base_unet, hint.shape[1], _embedding_channels(state))
    merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = dict(base_unet.state_dict())
    for name in merged:
        if name in base and base[name].shape == merged[name].shape:
            merged[name] = base[name].detach().clone().float()
    last = _hint_last(state)
    for key, tensor in state.items():
        if key == "lora_controlnet":
            continue
        if key.endswith((".up", ".down")):
            if key.endswith(".down"):
                continue
            layer = key[: -len(".up")]
            name = controlnet_key(f"{layer}.weight", last)
            up, down = tensor.float(), state[f"{layer}.down"].float()
            weight = merged[name]
            merged[name] = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        else:
            name = controlnet_key(key, last)
            if name is None or name not in merged:
                raise LoraCompatError(f"Control-LoRA key {key} has no ControlNet parameter")
            merged[name] = tensor.float()
    dtype = next(base_unet.parameters()).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in merged.items()}, strict=True)
    return model.to(dtype)


# -- T2I-Adapter ------------------------------------------------------------------------------------------------
_FULL_BODY = re.compile(r"^body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)$")
_LIGHT_BODY = re.compile(r"^body\.(\d+)\.(?:(in_conv|out_conv)|body\.(\d+)\.(block1|block2))\.(weight|bias)$")


def t2i_adapter_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """TencentARC T2I-Adapter tensors → diffusers ``T2IAdapter`` tensors and its ``adapter_type``."""
    if any(k.startswith("adapter.") for k in state):
        return dict(state), "full_adapter_xl" if "adapter.body.3.resnets.0.block1.weight" not in state else \
            "full_adapter"
    light = any(".body." in k for k in state)
    out = {}
    for key, tensor in state.items():
        if key.startswith("conv_in."):
            out[f"adapter.{key}"] = tensor
        elif light and (m := _LIGHT_BODY.match(key)):
            block, conv, resnet, inner, param = m.groups()
            name = f"adapter.body.{block}.{conv}" if conv else f"adapter.body.{block}.resnets.{resnet}.{inner}"
            out[f"{name}.{param}"] = tensor
        elif not light and (m := _FULL_BODY.match(key)):
            index, part, param = int(m.group(1)), m.group(2), m.group(3)
            block, resnet = divmod(index, 2)
            name = f"adapter.body.{block}.in_conv" if part == "in_conv" else \
                f"adapter.body.{block}.resnets.{resnet}.{part}"
            out[f"{name}.{param}"] = tensor
        else:
            raise LoraCompatError(f"T2I-Adapter key {key} has no diffusers name")
    return out, "light_adapter" if light else "full_adapter"


def t2i_adapter_to_diffusers(source: Any) -> Any:
    """A diffusers ``T2IAdapter`` from a TencentARC (full or light) or diffusers-layout adapter checkpoint."""
    from diffusers import T2IAdapter

    state, _ = _load(source)
    mapped, kind = t2i_adapter_state_dict(state)
    conv_in = mapped["adapter.conv_in.weight"] if "adapter.conv_in.weight" in mapped else None
    blocks = sorted({int(k.split(".")[2]) for k in mapped if k.startswith("adapter.body.")})
    if kind == "light_adapter":
        # the light adapter adds one block after ``channels``: its width repeats the last one
        channels = [mapped[f"adapter.body.{b}.out_conv.weight"].shape[0] for b in blocks[:-1]]
        in_channels = mapped["adapter.body.0.in_conv.weight"].shape[1] // 64
        resnets = len({k.split(".")[4] for k in mapped if k.startswith("adapter.body.0.resnets.")})
    else:
        channels = [mapped[f"adapter.body.{b}.resnets.0.block1.weight"].shape[0] for b in blocks]
        in_channels = conv_in.shape[1] // 64
        resnets = len({k.split(".")[4] for k in mapped if k.startswith("adapter.body.0.resnets.")})
    adapter = T2IAdapter(in_channels=in_channels, channels=channels, num_res_blocks=resnets, downscale_factor=8,
                         adapter_type=kind)
    adapter.load_state_dict(mapped, strict=True)
    return adapter


def save_diffusers(model: Any, out: str | os.PathLike) -> None:
    model.save_pretrained(out, safe_serialization=True)
