"""PEFT adapters of tuner types lora_compat does not read (VeRA, FourierFT, HRA, MiSS, AdaLoRA, and OFT as
peft <= 0.15.2 wrote it, ``oft_r`` / ``oft_s``): recognised by their keys
(``base_model.model.<module>.<tuner parameter>``) and refused by name; the tuner type is the ``peft_type`` of the
``adapter_config.json`` beside the file, else the one its parameter names belong to. LoRA is the ``peft``
dialect's, LoHa/LoKr/OFT/BOFT/IA3 the ``peft-lycoris`` one's.
"""
from __future__ import annotations

import json

from ..files import Header
from .base import Match, RefusingDialect, any_key_starts
from .peft import PREFIX
from .peft_lycoris import split_tuner_key

#: PEFT tuner parameter names (``adapter_layer_names``, one key segment) → the tuner type
TUNER_PARAMS = {
    **dict.fromkeys(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), "LoHa"),
    **dict.fromkeys(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"), "LoKr"),
    **dict.fromkeys(("oft_R", "oft_r", "oft_s", "oft_embedding_R"), "OFT"),
    **dict.fromkeys(("boft_R", "boft_s"), "BOFT"),
    "ia3_l": "IA3", "vera_lambda_b": "VeRA", "vera_lambda_d": "VeRA", "fourierft_spectrum": "FourierFT",
    "hra_u": "HRA", "miss_block": "MiSS", "lora_E": "AdaLoRA",
}
#: ``peft_type`` of adapter_config.json → the tuner's name as PEFT writes it
PEFT_TYPES = {"LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT", "BOFT": "BOFT", "IA3": "IA3", "VERA": "VeRA",
              "FOURIERFT": "FourierFT", "HRA": "HRA", "MISS": "MiSS", "ADALORA": "AdaLoRA"}


def tuner_of_key(key: str) -> tuple[str, str] | None:
    """``(module, tuner parameter)`` of a ``base_model.model.`` key whose parameter (one of its last two
    segments: ``...to_q.vera_lambda_b``, ``...to_q.oft_r``) belongs to a PEFT tuner lora_compat does not read."""
    if not key.startswith(PREFIX) or split_tuner_key(key):
        return None
    parts = key[len(PREFIX):].split(".")
    for at in (len(parts) - 1, len(parts) - 2):
        if at > 0 and parts[at] in TUNER_PARAMS:
            return ".".join(parts[:at]), parts[at]
    return None


def config_type(header: Header) -> str | None:
    """``peft_type`` of the ``adapter_config.json`` beside the file, if any."""
    if header.path is None:
        return None
    try:
        config = json.loads((header.path.parent / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    return str(config.get("peft_type") or "").upper() or None if isinstance(config, dict) else None


class PeftTunerRecogniser(RefusingDialect):
    id = "peft-tuner"
    description = "PEFT adapters of other tuner types (VeRA, FourierFT, HRA, ...): not supported"

    def detect(self, header: Header) -> Match | None:
        if not any_key_starts(header, PREFIX):
            return None
        keys = list(header.keys())
        claimed = sum(1 for k in keys if tuner_of_key(k))
        if claimed == 0:
            return None
        note = f"{claimed} base_model.model. keys of PEFT tuner parameters"
        return Match(self.id, claimed / len(keys), (note,))

    def explain(self, header: Header) -> str:
        found = [hit for hit in map(tuner_of_key, header.keys()) if hit]
        params = sorted({param for _, param in found})
        peft_type = config_type(header)
        name = PEFT_TYPES.get(peft_type or "") or "/".join(sorted({TUNER_PARAMS[p] for p in params}))
        evidence = f"{', '.join(params)} on {len({module for module, _ in found})} modules"
        if peft_type:
            evidence += f"; adapter_config.json: peft_type {peft_type}"
        return (f"is a PEFT {name} adapter ({evidence}): of PEFT's tuners, lora_compat reads LoRA, LoHa, LoKr, "
                "OFT (as peft > 0.15.2 writes it), BOFT and IA3; load it with peft (PeftModel.from_pretrained)")
