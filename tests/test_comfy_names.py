"""ComfyUI's text-encoder names: what the host converters write reads back to the same component, for every base."""
from __future__ import annotations

import pytest

from lora_compat import plugins
from lora_compat.dialects.flux_names import comfy_components, resolve_bfl
from lora_compat.dialects.kohya_names import kohya_names

#: the prefix ComfyUI holds each base's text encoders under (comfy/sd1_clip.py, sd2_clip.py, sdxl_clip.py, flux.py)
EXPECTED = {"sd15": {"text_encoder": "text_encoders.clip_l.transformer."},
            "sd2": {"text_encoder": "text_encoders.clip_h.transformer."},
            "sdxl": {"text_encoder": "text_encoders.clip_l.transformer.",
                     "text_encoder_2": "text_encoders.clip_g.transformer."},
            "flux1": {"text_encoder": "text_encoders.clip_l.transformer.",
                      "text_encoder_2": "text_encoders.t5xxl.transformer."}}


@pytest.mark.parametrize("base", sorted(EXPECTED))
def test_written_text_encoder_names_read_back(base):
    index = plugins.archs()[base].index
    encoders = sorted(c for c in index.components if c.startswith("text_encoder"))
    assert encoders == sorted(EXPECTED[base])
    targets = [f"{c}.{path}" for c in encoders for path in sorted(index.components[c])[:5]]
    names = kohya_names(index, targets, comfy=True, base=base)
    assert sorted(names) == sorted(targets)
    inverse = comfy_components(base)
    for target, host in names.items():
        component, _, path = target.partition(".")
        prefix = EXPECTED[base][component]
        assert host.name.startswith(prefix) and host.rows is None
        assert inverse[prefix] == component
        assert index.resolve(f"{inverse[prefix]}.{host.name[len(prefix):]}") == (component, path)
        if base == "flux1":  # the BFL dialect's own reader
            assert resolve_bfl(index, host.name) == target


def test_unknown_base_keeps_the_layout_default():
    index = plugins.archs()["sdxl"].index
    targets = [f"text_encoder_2.{sorted(index.components['text_encoder_2'])[0]}"]
    names = kohya_names(index, targets, comfy=True, base="the host's model")
    assert names[targets[0]].name.startswith("text_encoders.clip_g.transformer.")
