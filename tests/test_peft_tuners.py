"""PEFT adapter files of tuner types lora_compat does not read (VeRA, FourierFT, OFT as peft <= 0.15.2 wrote it)
are named for what they are and refused; never "a full model checkpoint" or "no dialect recognises these keys".
LoHa/LoKr/OFT/BOFT/IA3 are read: see test_peft_lycoris.py."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat.cli import main
from lora_compat.errors import NotALoraError

from lora_compat.oracles.models import make_sd15_components, one_thread

TARGETS = ["to_k", "to_v", "ff.net.2"]
#: tuner name → (config class, its arguments, the parameters PEFT saves)
TUNERS = {
    "FourierFT": ("FourierFTConfig", dict(n_frequency=8), "fourierft_spectrum"),
    "VeRA": ("VeraConfig", dict(r=4, target_modules=["to_k", "to_v"], save_projection=False),
             "vera_lambda_b, vera_lambda_d"),
}


@pytest.fixture(scope="module")
def unet():
    return make_sd15_components(seed=7)["unet"]


def write_peft_adapter(tmp: Path, unet, tuner: str) -> Path:
    """``get_peft_model(unet, <Tuner>Config).save_pretrained``: adapter_model.safetensors + adapter_config.json."""
    import peft

    config_class, kwargs, _ = TUNERS[tuner]
    kwargs = {"target_modules": TARGETS, **kwargs}
    with one_thread():
        model = peft.get_peft_model(copy.deepcopy(unet), getattr(peft, config_class)(**kwargs))
        model.save_pretrained(tmp / tuner)
    return tmp / tuner / "adapter_model.safetensors"


def write_old_oft(tmp: Path, unet) -> Path:
    """OFT as peft <= 0.15.2 saved it (peft 0.21 refuses to load it): ``oft_r [r, b, b]`` and ``oft_s [out, 1]``
    per module, ``peft_type`` OFT."""
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith((".to_k", ".to_v")):
            tensors[f"base_model.model.{name}.oft_r"] = torch.zeros(2, module.in_features // 2, module.in_features // 2)
            tensors[f"base_model.model.{name}.oft_s"] = torch.ones(module.out_features, 1)
    (tmp / "OFT").mkdir()
    save_file(tensors, str(tmp / "OFT" / "adapter_model.safetensors"))
    (tmp / "OFT" / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "r": 2}))
    return tmp / "OFT" / "adapter_model.safetensors"


def _modules(unet, targets) -> int:
    return sum(1 for name, _ in unet.named_modules() if name.endswith(tuple(f".{t}" for t in targets)))


@pytest.mark.parametrize("tuner", [*TUNERS, "OFT"])
@pytest.mark.parametrize("config", ["with adapter_config.json", "keys only"])
def test_peft_tuner_adapters_are_named_and_refused(tmp_path: Path, unet, tuner: str, config: str, capsys) -> None:
    if tuner == "OFT":
        path, params, targets = write_old_oft(tmp_path, unet), "oft_r, oft_s", ["to_k", "to_v"]
    else:
        path, params = write_peft_adapter(tmp_path, unet, tuner), TUNERS[tuner][2]
        targets = TUNERS[tuner][1].get("target_modules", TARGETS)
    evidence = rf"{params} on {_modules(unet, targets)} modules"
    if config == "keys only":  # the tuner is named from the key names alone
        path = path.rename(tmp_path / f"{tuner}.safetensors")
    else:
        evidence += rf"; adapter_config.json: peft_type {tuner.upper()}"
    message = (rf"{path.name}: is a PEFT {tuner} adapter \({evidence}\): of PEFT's tuners, lora_compat reads LoRA, "
               r"LoHa, LoKr, OFT \(as peft > 0\.15\.2 writes it\), BOFT and IA3; load it with peft "
               r"\(PeftModel\.from_pretrained\)$")
    with pytest.raises(NotALoraError, match=message) as caught:
        lora_compat.inspect(path)
    assert caught.value.kind == "peft-tuner"
    with pytest.raises(NotALoraError, match=message):
        lora_compat.convert(path, "kohya", tmp_path / "out.safetensors")
    capsys.readouterr()  # peft's own warnings while writing
    assert main(["inspect", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"PEFT {tuner} adapter" in captured.err and "lora_compat reads LoRA, LoHa" in captured.err
    assert main(["convert", str(path), "--to", "kohya", "-o", str(tmp_path / "out.safetensors")]) == 2
    assert f"PEFT {tuner} adapter" in capsys.readouterr().err
