"""PEFT adapter files of other tuner types (OFT, BOFT, LoHa, LoKr), written by real peft, are named for what they
are and refused as not supported yet; never "a full model checkpoint" or "no dialect recognises these keys"."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

import lora_compat
from lora_compat.cli import main
from lora_compat.errors import NotALoraError

from lora_compat.oracles.models import make_sd15_components, one_thread

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: tuner name → (config class, its arguments, the parameters PEFT saves)
TUNERS = {
    "OFT": ("OFTConfig", dict(r=0, oft_block_size=4), "oft_R"),
    "BOFT": ("BOFTConfig", dict(boft_block_size=4), "boft_R, boft_s"),
    "LoHa": ("LoHaConfig", dict(r=4, alpha=8), "hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b"),
    "LoKr": ("LoKrConfig", dict(r=4, alpha=8), "lokr_w1, lokr_w2"),
}


@pytest.fixture(scope="module")
def unet():
    return make_sd15_components(seed=7)["unet"]


def write_peft_adapter(tmp: Path, unet, tuner: str) -> Path:
    """``get_peft_model(unet, <Tuner>Config).save_pretrained``: adapter_model.safetensors + adapter_config.json."""
    import peft

    config_class, kwargs, _ = TUNERS[tuner]
    with one_thread():
        model = peft.get_peft_model(copy.deepcopy(unet), getattr(peft, config_class)(target_modules=TARGETS, **kwargs))
        model.save_pretrained(tmp / tuner)
    return tmp / tuner / "adapter_model.safetensors"


def _modules(unet) -> int:
    return sum(1 for name, _ in unet.named_modules() if name.endswith(tuple(f".{t}" for t in TARGETS)))


@pytest.mark.parametrize("tuner", sorted(TUNERS))
@pytest.mark.parametrize("config", ["with adapter_config.json", "keys only"])
def test_peft_tuner_adapters_are_named_and_refused(tmp_path: Path, unet, tuner: str, config: str, capsys) -> None:
    path = write_peft_adapter(tmp_path, unet, tuner)
    evidence = rf"{TUNERS[tuner][2]} on {_modules(unet)} modules"
    if config == "keys only":  # the tuner is named from the key names alone
        path = path.rename(tmp_path / f"{tuner}.safetensors")
    else:
        evidence += rf"; adapter_config.json: peft_type {tuner.upper()}"
    message = (rf"{path.name}: is a PEFT {tuner} adapter \({evidence}\): PEFT adapter files of tuners other than "
               r"LoRA \(LoHa/LoKr/OFT/BOFT\.\.\.\) are not supported yet; load it with peft "
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
    assert f"PEFT {tuner} adapter" in captured.err and "not supported yet" in captured.err
    assert main(["convert", str(path), "--to", "kohya", "-o", str(tmp_path / "out.safetensors")]) == 2
    assert f"PEFT {tuner} adapter" in capsys.readouterr().err
