"""SD.Next (058a7f0c): the real ``modules.lora`` package, ``ExtraNetworkLora.changed()`` and ``module_types``,
with the lora_compat hooks installed."""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from torch import nn

from hostmodels import STRENGTH, VARIANTS, assert_close, expected
from hoststubs import sdnext_env
from lora_compat.adapters import webui


@pytest.fixture(scope="module")
def sdnext(hosts_dir, tmp_path_factory):
    env, host = sdnext_env(hosts_dir, tmp_path_factory.mktemp("sdnext-loras"))
    host.shared.sd_model = types.SimpleNamespace()
    real_types = [type(t).__name__ for t in host.lora_common.module_types]
    webui.install_sdnext(host.lora_common, host.lora_load, host.network, host.extra_networks_lora)
    webui.install_sdnext(host.lora_common, host.lora_load, host.network, host.extra_networks_lora)  # idempotent
    host.real_types = real_types
    yield host
    env.close()


def test_sdnext_master_changed_keeps_its_tuple_and_restores_on_an_empty_request(sdnext) -> None:
    """SD.Next master's ``changed()`` returns ``(bool, reason)`` and ``activate`` unpacks it. An empty request
    while LoRAs are applied must count as a change (else they stay applied), in that same form."""
    sdnext.shared.sd_model = types.SimpleNamespace()
    extra = sdnext.extra_networks_lora.ExtraNetworkLora()
    assert extra.changed(["a:1:1"]) == (True, "num changed")
    sdnext.lora_common.previously_loaded_networks = [types.SimpleNamespace(name="a")]  # activate() applied it
    assert extra.changed(["a:1:1"]) == (False, "none")
    assert extra.changed(["a:1:1"], ["unet"], []) == (True, "num changed")  # a filtered call resets the cache
    has_changed, reason = extra.changed([])  # what activate() does with the answer
    assert has_changed is True and "empty request" in reason
    sdnext.lora_common.previously_loaded_networks = []
    assert extra.changed([]) == (False, "none")  # nothing applied: no reload


def test_sdnext_module_type_comes_first(sdnext) -> None:
    types_now = sdnext.lora_common.module_types
    assert getattr(types_now[0], "lora_compat", False) and isinstance(types_now[0], sdnext.network.ModuleType)
    assert [type(t).__name__ for t in types_now[1:]] == sdnext.real_types
    assert getattr(sdnext.lora_load.load_safetensors, "lora_compat", False)


def sdnext_load(sdnext, components: dict[str, nn.Module], path: Path, model_type: str, strength: float = STRENGTH
                ) -> dict[str, torch.Tensor]:
    """SD.Next's own ``lora_load.load_safetensors`` on a diffusers pipeline holding ``components``; the value
    each loaded module's ``calc_updown`` gives its weight (and bias), keyed ``<component>.<parameter>``."""
    sdnext.shared.sd_model = types.SimpleNamespace(**components)
    sdnext.shared.sd_loaded, sdnext.shared.sd_model_type = True, model_type
    name = f"{path.parent.name}-{path.stem}"
    net = sdnext.lora_load.load_safetensors(name, sdnext.network.NetworkOnDisk(name, str(path)))
    net.te_multiplier = net.unet_multiplier = strength
    owner = {id(m): f"{c}.{p}" if p else c for c, root in components.items() for p, m in root.named_modules()}
    values = {}
    for module in net.modules.values():
        assert getattr(module, "lora_compat_patch", None) is not None
        weight_change, bias_change = module.calc_updown(module.sd_module.weight)
        values[f"{owner[id(module.sd_module)]}.weight"] = module.sd_module.weight.detach().float() + weight_change
        if bias_change is not None:
            values[f"{owner[id(module.sd_module)]}.bias"] = module.sd_module.bias.detach().float() + bias_change
    return values


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdnext_loads_every_variant_exactly(variant, sdnext, sd15, sd_files) -> None:
    """SD.Next names the diffusers modules themselves (``lora_unet_<path>``, ``lora_te_<path>`` for a single
    text encoder): every module of the file reaches its module, with lora_compat's values."""
    want = expected(sd_files[variant], sd15)
    got = sdnext_load(sdnext, sd15, sd_files[variant], "sd")
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    for key, value in got.items():
        assert_close(value, want.get(key, sd15[key.partition(".")[0]].get_parameter(key.partition(".")[2])), key)


@pytest.mark.parametrize("kind", ["partial", "kohya"])
def test_sdnext_flux_files(kind, sdnext, tmp_path) -> None:
    """Flux on SD.Next (``lora_transformer_<diffusers path>``): partial q/k/v and fused kohya qkv/linear1 files
    arrive split exactly, with the row ranges of the loaded model."""
    from flux_models import PARTIAL, diffusers_file, kohya_flux_file, make_flux

    flux = make_flux()
    path = (diffusers_file(tmp_path / "f.safetensors", flux, PARTIAL) if kind == "partial"
            else kohya_flux_file(tmp_path / "f.safetensors", flux))
    components = {"transformer": flux}
    webui.set_model(components=components)  # what the script does on model load
    try:
        want = expected(path, components)
        got = sdnext_load(sdnext, components, path, "f1")
    finally:
        webui.set_model()
    assert set(want) <= set(got), sorted(set(want) - set(got))[:5]
    for key, value in want.items():
        assert_close(got[key], value, key)
