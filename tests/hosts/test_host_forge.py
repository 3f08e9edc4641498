"""Forge (dfdcbab6) with the extension installed: its real ``networks.load_lora_for_models`` (``load_lora`` for the
UNet keys, then for the text encoder's, on what the first call left) and its real ``LoraLoader`` merge."""
from __future__ import annotations

import pytest
from torch import nn

from hostmodels import (STRENGTH, VARIANTS, assert_close, assert_restored, assert_state, comfy_unet_config,
                        expected, parameters_by_name, sequential, sgm_unet, text_model, tree)
from hoststubs import forge_env
from lora_compat.adapters import webui


class ForgePatcher:
    """backend/patcher/base.py's ModelPatcher at the pinned commit (not in shared/hosts), reduced to the LoRA
    bookkeeping: ``clone`` copies ``lora_patches``; ``add_patches`` files them under
    ``(filename, strength_patch, strength_model, online_mode)``, for keys the model has."""

    def __init__(self, model: nn.Module, lora_patches: dict | None = None):
        self.model, self.lora_patches = model, dict(lora_patches or {})

    @property
    def cond_stage_model(self) -> nn.Module:  # Forge's CLIP object exposes the text model under this name
        return self.model

    def clone(self) -> "ForgePatcher":
        return ForgePatcher(self.model, self.lora_patches)

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        model_keys = {k for k, _ in self.model.named_parameters()}
        this = {}
        for key, value in patches.items():
            if key in model_keys:
                this.setdefault(key, []).append([strength_patch, value, strength_model, None, None])
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = this
        return set(this)


@pytest.fixture(scope="module")
def forge(hosts_dir, tmp_path_factory):
    env, host = forge_env(hosts_dir, tmp_path_factory.mktemp("forge-loras"))
    webui.install_forge(host.networks, host.backend)
    webui.install_forge(host.networks, host.backend)  # idempotent
    yield host
    env.close()


def forge_models(components: dict[str, nn.Module]) -> tuple[ForgePatcher, ForgePatcher]:
    """Forge's UNet patcher (a KModel: ``diffusion_model.<SGM>``, its config) and CLIP patcher
    (``clip_l.transformer.text_model...``) over the tiny SD1.5's own modules."""
    diffusion_model, _ = sgm_unet(components["unet"])
    diffusion_model.config = comfy_unet_config(components["unet"])
    kmodel = tree({"diffusion_model": diffusion_model})
    kmodel.config = type("Config", (), {"huggingface_repo": "runwayml/stable-diffusion-v1-5"})()
    clip = tree({"clip_l.transformer.text_model": text_model(components["text_encoder"])})
    return ForgePatcher(kmodel), ForgePatcher(clip)


def run_forge(forge, components, paths, strength=STRENGTH) -> tuple[ForgePatcher, ForgePatcher]:
    """What Forge's ``load_networks`` does per file, then the real ``LoraLoader.refresh`` merge."""
    unet, clip = forge_models(components)
    for path in paths:
        unet, clip = forge.networks.load_lora_for_models(unet, clip, forge.networks.load_lora_state_dict(str(path)),
                                                          strength, strength, filename=str(path))
    return unet, clip


@pytest.mark.parametrize("variant", VARIANTS)
def test_forge_applies_every_module_exactly_and_restores(variant, forge, sd15, sd_files, capsys) -> None:
    path = sd_files[variant]
    base = parameters_by_name(sd15)
    want = expected(path, sd15)
    unet, clip = run_forge(forge, sd15, [path])
    assert not any("no module of this model" in line for line in capsys.readouterr().err.splitlines())
    te_keys = {k for k in want if k.startswith("text_encoder.")}
    assert te_keys, "the file patches the text encoder"
    loaders = [forge.backend.LoraLoader(unet.model), forge.backend.LoraLoader(clip.model)]
    try:
        for loader, patcher in zip(loaders, (unet, clip)):
            loader.refresh(patcher.lora_patches)
        assert_state(sd15, want, base)
    finally:
        for loader in loaders:
            loader.refresh({})  # no LoRA: Forge puts its backups back
    assert_restored(sd15, base)


def test_forge_text_encoder_patches_lora_compat_computes_reach_the_text_encoder(forge, sd15, sd_files) -> None:
    """The seed bug: a LyCORIS DoRA file on SD1.5 lost every text-encoder module (the wrapper removed the
    ``.lora_compat`` keys before Forge's first ``load_lora`` call, so its second call, for the CLIP keys, got
    none)."""
    path = sd_files["dora_out"]
    tensors = forge.networks.load_lora_state_dict(str(path))
    ours = {k[: -len(".lora_compat")] for k in tensors if k.endswith(".lora_compat")}
    te_modules = {name for name in ours if name.startswith("text_encoders.")}
    unet, clip = run_forge(forge, sd15, [path])
    (clip_patches,) = clip.lora_patches.values()
    assert len(te_modules) > 0 and len(clip_patches) == len(te_modules)
    assert all(patches[0][1][0] == "lora_compat" for patches in clip_patches.values())
    (unet_patches,) = unet.lora_patches.values()
    assert len(unet_patches) == len(ours) - len(te_modules)


def test_forge_norm_bias_changes_need_no_model_weight(forge, sd15, sd_files) -> None:
    """A patch on a bias gets the shape of its module's weight from the model Forge is patching."""
    unet, clip = run_forge(forge, sd15, [sd_files["norm"]])
    shapes = [(v[0][1][1][2], tuple(p.model.get_parameter(k[: -len(".bias")] + ".weight").shape))
              for p in (unet, clip) for patches in p.lora_patches.values() for k, v in patches.items()
              if k.endswith(".bias") and v[0][1][0] == "lora_compat"]
    assert shapes and all(given == real for given, real in shapes)


def test_forge_two_files_apply_in_order(forge, sd15, sd_files) -> None:
    """Two LoRAs in one prompt: Forge merges the second on the weights the first produced."""
    first, second = sd_files["dora_out"], sd_files["diag_oft"]
    base = parameters_by_name(sd15)
    want = sequential(sd15, [first, second])
    unet, clip = run_forge(forge, sd15, [first, second])
    loaders = [forge.backend.LoraLoader(unet.model), forge.backend.LoraLoader(clip.model)]
    try:
        for loader, patcher in zip(loaders, (unet, clip)):
            loader.refresh(patcher.lora_patches)
        got = parameters_by_name(sd15)
    finally:
        for loader in loaders:
            loader.refresh({})
    assert_restored(sd15, base)
    for key, value in got.items():
        assert_close(value, want[key], key)


# -- the host facts the matrix states (lora_compat.adapters.routes.HOST_FACTS), re-measured on Forge's own code --
def test_forge_fact_flux_control_loras_are_read_by_forge_itself(forge, tmp_path) -> None:
    """``HOST_FACTS[("forge", "bfl-control")]``: with the extension installed a FLUX.1 Control LoRA reaches Forge
    whole, Forge's own ``load_lora`` takes every key of it, and its merge widens ``img_in`` to the padded weight
    plus B·A."""
    import torch
    from safetensors.torch import load_file

    from flux_models import control_file, make_bfl_host, make_flux
    from lora_compat.adapters.routes import HOST_FACTS

    assert HOST_FACTS[("forge", "bfl-control")].cell == "works: Forge reads Control LoRAs itself"
    flux = make_flux()
    path = control_file(tmp_path / "control.safetensors", flux)
    raw = load_file(str(path))
    lora = forge.networks.load_lora_state_dict(str(path))
    assert lora.keys() == raw.keys() and all(torch.equal(lora[k], raw[k]) for k in raw)
    host = make_bfl_host(flux)
    to_load = {}
    for name, module in host.named_modules():
        for param in ("weight", "scale"):
            if param in module._parameters:
                x = f"diffusion_model.{name}" + (".scale" if param == "scale" else "")
                to_load[x] = f"diffusion_model.{name}.{param}"
    patches, remaining = forge.backend.load_lora(lora, to_load)
    assert remaining == {}  # Forge loaded every key of the file
    weights = {f"diffusion_model.{n}" for n, p in host.named_parameters()}
    assert set(patches) == weights  # every weight, bias and norm scale of the BFL model is patched
    img_in = host.img_in.weight.detach()
    merged = forge.backend.merge_lora_to_weight([(0.6, patches["diffusion_model.img_in.weight"], 1.0, None, None)],
                                                img_in)
    want = torch.cat([img_in, torch.zeros_like(img_in)], 1) + 0.6 * raw["img_in.lora_B.weight"] @ raw["img_in.lora_A.weight"]
    assert merged.shape == (img_in.shape[0], 2 * img_in.shape[1])
    assert_close(merged, want, "img_in")
