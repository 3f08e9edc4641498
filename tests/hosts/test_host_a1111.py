"""A1111 v1.8.0's built-in Lora extension (``networks.load_network``, ``module_types``, ``network_apply_weights``),
real code, with the lora_compat extension installed by its own script as an API-only server runs it."""
from __future__ import annotations

import importlib.util
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora_compat
from hostmodels import (STRENGTH, VARIANTS, assert_close, assert_restored, assert_state, expected,
                        parameters_by_name, peft_tuner_expected, save_checkpoint, sequential, sgm_unet, text_model,
                        tree)
from hoststubs import a1111_env
from lora_compat.adapters import webui
from lora_compat.oracles.peft_oracle import write_peft_file

SCRIPT = Path(webui.__file__).parent / "scripts" / "lora_compat_script.py"
HOOKED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)  # the layers whose forward A1111 patches


def a1111_sd_model(components: dict[str, nn.Module]) -> types.SimpleNamespace:
    """An SD1 model as A1111 holds it: ``model.diffusion_model.<SGM>`` and the CLIP wrapper's
    ``transformer.text_model...`` (the tiny SD1.5's own modules)."""
    diffusion_model, _ = sgm_unet(components["unet"])
    wrapped = tree({"transformer.text_model": text_model(components["text_encoder"])})
    return types.SimpleNamespace(is_sdxl=False, model=tree({"diffusion_model": diffusion_model}),
                                 cond_stage_model=types.SimpleNamespace(wrapped=wrapped))


@pytest.fixture(scope="module")
def a1111(hosts_dir, tmp_path_factory, sd15):
    sd_model = a1111_sd_model(sd15)
    env, host = a1111_env(hosts_dir, tmp_path_factory.mktemp("a1111-loras"), sd_model)
    spec = importlib.util.spec_from_file_location("lora_compat_script", SCRIPT)
    host.script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host.script)  # what A1111's script loader does with extensions/*/scripts/*.py
    host.script_callbacks.before_ui_callback()  # run by webui() and by api_only() alike
    host.networks.assign_network_names_to_compvis_modules(sd_model)  # Lora's own on_model_loaded callback
    host.sd_model = sd_model
    yield host
    host.networks.loaded_networks.clear()
    env.close()


def apply_networks(a1111, nets: list) -> None:
    """A1111's forward hooks: every hooked layer brings its weights to the loaded networks."""
    a1111.networks.loaded_networks[:] = nets
    for module in a1111.sd_model.network_layer_mapping.values():
        if isinstance(module, HOOKED):
            a1111.networks.network_apply_weights(module)


def load(a1111, path: Path, strength: float = STRENGTH):
    net = a1111.networks.load_network(path.stem, a1111.network.NetworkOnDisk(path.stem, str(path)))
    net.te_multiplier = net.unet_multiplier = strength  # as load_networks sets them
    return net


def assert_applies(a1111, net, components, want: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> None:
    """With ``net`` loaded the weights are ``want`` (the rest ``base``); unloaded, ``base`` bit for bit."""
    try:
        apply_networks(a1111, [net])
        assert_state(components, want, base)
    finally:
        apply_networks(a1111, [])
    assert_restored(components, base)


def test_a1111_api_only_server_registers_the_setting_and_installs_the_hooks(a1111) -> None:
    """A1111 v1.8.0's ``api_only()`` runs ``before_ui`` and ``app_started`` callbacks, never ``ui_settings``:
    the setting lives in the option templates that ``/sdapi/v1/options`` reads, and the hooks are in."""
    assert a1111.script.SETTING in a1111.shared.options_templates
    assert a1111.shared.options_templates[a1111.script.SETTING].section == ("lora_compat", "lora_compat")
    assert "ui_settings" not in a1111.script_callbacks.registered
    assert vars(a1111.shared.opts)[a1111.script.SETTING] is True  # listed by GET /sdapi/v1/options
    assert getattr(a1111.networks.module_types[0], "lora_compat", False)
    assert getattr(a1111.networks.load_network, "lora_compat", False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a1111_applies_every_variant_exactly_and_restores(variant, a1111, sd15, sd_files) -> None:
    path = sd_files[variant]
    base = parameters_by_name(sd15)
    want = expected(path, sd15)
    net = load(a1111, path)
    assert all(getattr(m, "lora_compat_patch", None) is not None for m in net.modules.values())
    assert_applies(a1111, net, sd15, want, base)


def test_a1111_two_networks_apply_in_order(a1111, sd15, sd_files) -> None:
    """Two LoRAs in one prompt: A1111 applies the second on the weights the first produced."""
    first, second = sd_files["dora_out"], sd_files["diag_oft"]
    base = parameters_by_name(sd15)
    want = sequential(sd15, [first, second])
    try:
        apply_networks(a1111, [load(a1111, first), load(a1111, second)])
        got = parameters_by_name(sd15)
    finally:
        apply_networks(a1111, [])
    assert_restored(sd15, base)
    for key, value in got.items():
        assert_close(value, want[key], key)


def test_a1111_setting_off_leaves_the_file_to_a1111(a1111, sd_files) -> None:
    a1111.shared.opts.lora_compat_enabled = False  # what POST /sdapi/v1/options sets
    try:
        net = load(a1111, sd_files["lora"])
    finally:
        a1111.shared.opts.lora_compat_enabled = True
    assert net.modules and all(type(m).__module__ == "network_lora" for m in net.modules.values())


def test_a1111_unmatched_keys_are_reported_loudly(a1111, sd15, tmp_path, capsys) -> None:
    path, _ = write_peft_file(tmp_path, sd15, "diffusers")
    tensors = load_file(str(path))
    tensors["unet.not_a_module.lora_A.weight"] = torch.zeros(2, 4)
    tensors["unet.not_a_module.lora_B.weight"] = torch.zeros(4, 2)
    save_file(tensors, str(tmp_path / "extra.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    load(a1111, tmp_path / "extra.safetensors")
    err = capsys.readouterr().err
    assert "[lora_compat] extra.safetensors: 2 keys match no module" in err and "not_a_module" in err


# -- the host facts the matrix states (lora_compat.adapters.routes.HOST_FACTS), re-measured on A1111's own code --
@pytest.mark.parametrize("enabled", [False, True], ids=["a1111 alone", "with lora_compat"])
def test_a1111_fact_a_flux_lora_matches_no_layer(a1111, tmp_path, enabled) -> None:
    """``HOST_FACTS[("a1111", "flux1")]``: A1111's layer names come from its loaded SD model only; a FLUX.1 LoRA
    (sd-scripts BFL names, every module) loads with no module, whether lora_compat converts it first or not."""
    from flux_models import kohya_flux_file, make_flux
    from lora_compat.adapters.routes import HOST_FACTS

    assert HOST_FACTS[("a1111", "flux1")].cell == "refused: AUTOMATIC1111 has no Flux"
    path = kohya_flux_file(tmp_path / "flux.safetensors", make_flux())
    a1111.shared.opts.lora_compat_enabled = enabled
    try:
        net = load(a1111, path)
    finally:
        a1111.shared.opts.lora_compat_enabled = True
    assert net.modules == {}


@pytest.mark.parametrize("variant", ["loha_effective_conv", "lokr", "lokr_decompose_both", "oft", "boft_butterfly",
                                     "ia3"])
@pytest.mark.parametrize("route", ["lora_compat", "a1111 on the webui conversion"])
def test_a1111_peft_tuner_files_give_peft_merge(variant, route, a1111, sd15, tmp_path) -> None:
    """PEFT's LoHa/LoKr/OFT/BOFT/IA3: the raw file through the lora_compat extension, or ``convert --to webui``
    (OFT/BOFT/IA3: exact diffs of ``--checkpoint``) through A1111's own network modules (setting off)."""
    path, want = peft_tuner_expected(tmp_path, sd15, variant)
    base = parameters_by_name(sd15)
    diffs = variant.startswith(("oft", "boft", "ia3"))
    if route != "lora_compat":
        checkpoint = save_checkpoint(tmp_path / "checkpoint", sd15) if diffs else None
        lora_compat.convert(path, "webui", tmp_path / "webui.safetensors", checkpoint=checkpoint)
        path = tmp_path / "webui.safetensors"
        a1111.shared.opts.lora_compat_enabled = False
    try:
        net = load(a1111, path)
    finally:
        a1111.shared.opts.lora_compat_enabled = True
    if route == "lora_compat":
        assert all(getattr(m, "lora_compat_patch", None) is not None for m in net.modules.values())
    else:  # A1111's own module types
        own = "network_full" if diffs else "network_hada" if variant.startswith("loha") else "network_lokr"
        assert {type(m).__module__ for m in net.modules.values()} == {own}
    assert_applies(a1111, net, sd15, want, base)
