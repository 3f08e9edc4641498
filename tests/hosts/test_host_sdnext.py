"""SD.Next (058a7f0c): the real ``modules.lora`` package, ``ExtraNetworkLora.changed()`` and ``module_types``,
with the lora_compat hooks installed."""
from __future__ import annotations

import types

import pytest

from hoststubs import sdnext_env
from lora_compat.adapters import webui


@pytest.fixture()
def sdnext(hosts_dir, tmp_path):
    env, host = sdnext_env(hosts_dir, tmp_path)
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
