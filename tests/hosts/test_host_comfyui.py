"""ComfyUI (a125cd84) with the lora_compat node: ComfyUI's real key maps (``comfy.lora``), weight adapters,
``calculate_weight``, ``ModelPatcher`` (patch / unpatch), ``comfy.sd.load_lora_for_models`` and ``CLIP``."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_compat
from hostmodels import (STRENGTH, VARIANTS, assert_close, assert_restored, assert_state, comfy_unet_config,
                        expected, parameters_by_name, peft_tuner_expected, save_checkpoint, sequential, sgm_unet,
                        text_model, tree)
from lora_compat.adapters import comfyui
from lora_compat.hosts.convert import convert_for_host
from lora_compat.oracles.peft_oracle import write_peft_file

CPU = torch.device("cpu")


def comfy_models(comfy, components: dict[str, nn.Module], config: str = "SD15", clip_class: str = "SD1ClipModel",
                 clip_name: str = "clip_l"):
    """A ModelPatcher over a BaseModel-like module (``diffusion_model.<SGM>``, a ``model_config`` of the named
    ComfyUI class) and a real ``comfy.sd.CLIP`` over ``<clip_name>.transformer.text_model...``: both hold the
    tiny SD1.5's own modules."""
    diffusion_model, _ = sgm_unet(components["unet"])
    model = tree({"diffusion_model": diffusion_model})
    model.model_config = type(config, (), {"unet_config": comfy_unet_config(components["unet"])})()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = tree({f"{clip_name}.transformer.text_model": text_model(components["text_encoder"])},
                                 root=type(clip_class, (nn.Module,), {})())
    clip.patcher = comfy.model_patcher.ModelPatcher(clip.cond_stage_model, load_device=CPU, offload_device=CPU)
    clip.patcher.is_clip = True
    clip.tokenizer, clip.layer_idx, clip.tokenizer_options = None, None, {}
    clip.use_clip_schedule, clip.apply_hooks_to_conds = False, None
    return patcher, clip


def node(comfy, model, clip, path: Path, strength: float = STRENGTH):
    return comfyui.load_for_models(model, clip, str(path), strength, strength)


def patched(model, clip, run):
    """``run()`` while ComfyUI has the patches applied in place (as when it samples); then unpatched."""
    model.patch_model(device_to=CPU)
    clip.patcher.patch_model(device_to=CPU)
    try:
        return run()
    finally:
        model.unpatch_model(device_to=CPU)
        clip.patcher.unpatch_model(device_to=CPU)


@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyui_node_applies_every_variant_exactly_and_restores(variant, comfy, sd15, sd_files) -> None:
    path = sd_files[variant]
    base = parameters_by_name(sd15)
    want = expected(path, sd15)
    model, clip = node(comfy, *comfy_models(comfy, sd15), path)
    patched(model, clip, lambda: assert_state(sd15, want, base))
    assert_restored(sd15, base)


def test_comfyui_chained_nodes_apply_in_order(comfy, sd15, sd_files) -> None:
    """Two chained nodes whose kinds lora_compat computes (DoRA, then OFT): the second one applies to the
    weights the first produced, as ComfyUI chains its own LoRAs."""
    first, second = sd_files["dora_out"], sd_files["diag_oft"]
    base = parameters_by_name(sd15)
    want = sequential(sd15, [first, second])
    other_order = sequential(sd15, [second, first])
    model, clip = comfy_models(comfy, sd15)
    model, clip = node(comfy, model, clip, first)
    model, clip = node(comfy, model, clip, second)
    got = patched(model, clip, lambda: parameters_by_name(sd15))
    assert_restored(sd15, base)
    differs = [k for k in want if not torch.allclose(want[k], other_order[k], rtol=1e-4, atol=1e-6)]
    assert differs, "the two orders give the same weights: the test would not see the order"
    for key, value in got.items():
        assert_close(value, want[key], key)


def test_comfyui_chain_with_comfyuis_own_loader(comfy, sd15, sd_files) -> None:
    """ComfyUI's own loader (LoRA tensors under the names its key map reads) followed by the lora_compat node
    (DoRA)."""
    first, second = sd_files["lora"], sd_files["dora_in"]
    want = sequential(sd15, [first, second])
    model, clip = comfy_models(comfy, sd15)
    tensors = convert_for_host(str(first), "comfy").tensors
    model, clip = comfy.sd.load_lora_for_models(model, clip, tensors, STRENGTH, STRENGTH)
    model, clip = node(comfy, model, clip, second)
    got = patched(model, clip, lambda: parameters_by_name(sd15))
    for key, value in got.items():
        assert_close(value, want[key], key)


def test_comfyui_node_run_while_another_patch_is_applied(comfy, sd15, sd_files) -> None:
    """ComfyUI keeps the last sampled model patched in place; a node run then (a new LoRA, a new strength)
    still applies to the original weights once ComfyUI swaps patchers."""
    first, second = sd_files["dora_out"], sd_files["ia3"]
    base = parameters_by_name(sd15)
    want = expected(second, sd15)
    model, clip = comfy_models(comfy, sd15)
    model_a, clip_a = node(comfy, model, clip, first)
    model_b, clip_b = patched(model_a, clip_a, lambda: node(comfy, model, clip, second))
    patched(model_b, clip_b, lambda: assert_state(sd15, want, base))
    assert_restored(sd15, base)


def test_comfyui_base_comes_from_the_loaded_model(comfy, sd15, tmp_path) -> None:
    """A diffusers/PEFT file names modules that SD1.5 and SD2 share, and its header cannot tell which: on an SD2
    model (ComfyUI's ``SD20`` config, OpenCLIP-H held as ``clip_h``) its text-encoder modules reach ``clip_h``."""
    path, _ = write_peft_file(tmp_path, sd15, "diffusers")
    detection = lora_compat.detect(path)
    assert detection.base is None and detection.base_candidates[0] == "sd15"
    base = parameters_by_name(sd15)
    want = expected(path, sd15)
    assert any(k.startswith("text_encoder.") for k in want)
    model, clip = node(comfy, *comfy_models(comfy, sd15, "SD20", "SD2ClipModel", "clip_h"), path)
    patched(model, clip, lambda: assert_state(sd15, want, base))
    assert_restored(sd15, base)


def test_comfyui_loaded_base_is_read_from_config_and_clip_classes() -> None:
    config = {name: type(name, (), {})() for name in ("SD15", "SD20", "SDXL", "Flux")}
    sub = type("FluxSchnell", (type(config["Flux"]),), {})()
    model = lambda c: type("Patcher", (), {"model": type("M", (), {"model_config": c})()})()  # noqa: E731
    clip = lambda name: type("CLIP", (), {"cond_stage_model": type(name, (), {})()})()  # noqa: E731
    assert [comfyui.loaded_base(model(c), None) for c in [*config.values(), sub]] == \
        ["sd15", "sd2", "sdxl", "flux1", "flux1"]
    assert comfyui.loaded_base(None, clip("SDXLClipModel")) == "sdxl"
    assert comfyui.loaded_base(model(type("SDXLRefiner", (), {})()), clip("SDXLRefinerClipModel")) is None


def test_comfyui_node_inputs_and_outputs_read_like_loraloader(comfy) -> None:
    ours, theirs = comfyui.LoraCompatLoader, comfy.nodes.LoraLoader
    mine, real = ours.INPUT_TYPES()["required"], theirs.INPUT_TYPES()["required"]
    assert list(mine) == list(real)
    for name in ("model", "clip", "strength_model", "strength_clip"):
        assert mine[name] == real[name], name
    assert mine["lora_name"][1]["tooltip"].startswith(real["lora_name"][1]["tooltip"][:-1])
    assert (ours.RETURN_TYPES, ours.OUTPUT_TOOLTIPS, ours.FUNCTION, ours.CATEGORY) == \
        (theirs.RETURN_TYPES, theirs.OUTPUT_TOOLTIPS, theirs.FUNCTION, theirs.CATEGORY)
    info = comfyui.LoraCompatInfo
    assert info.INPUT_TYPES()["required"]["lora_name"][1]["tooltip"] == real["lora_name"][1]["tooltip"]
    assert len(info.OUTPUT_TOOLTIPS) == len(info.RETURN_TYPES) and info.DESCRIPTION


# -- Flux on ComfyUI's BFL layout ----------------------------------------------------------------------------------
def flux_patcher(comfy, flux):
    from flux_models import make_bfl_host

    host = make_bfl_host(flux)
    model = comfy.model_base.Flux()
    model.add_module("diffusion_model", host)
    config = flux.config
    model.model_config = type("Flux", (), {"unet_config": {
        "depth": config.num_layers, "depth_single_blocks": config.num_single_layers,
        "hidden_size": config.num_attention_heads * config.attention_head_dim}})()
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU), host


@pytest.mark.parametrize("kind", ["kohya", "partial"])
def test_comfyui_flux_files_exactly(kind, comfy, tmp_path) -> None:
    """Fused q/k/v LoRAs assembled exactly (block-diagonal for split sources, zero rows for absent parts)."""
    from flux_models import PARTIAL, diffusers_file, kohya_flux_file, make_bfl_host, make_flux

    flux = make_flux()
    path = (diffusers_file(tmp_path / "f.safetensors", flux, PARTIAL) if kind == "partial"
            else kohya_flux_file(tmp_path / "f.safetensors", flux))
    want_host = make_bfl_host(flux)
    lora_compat.Patcher({"transformer": want_host}).set([(path, STRENGTH)])
    patcher, host = flux_patcher(comfy, flux)
    base = {n: p.detach().clone() for n, p in host.named_parameters()}
    model, _ = comfyui.load_for_models(patcher, None, str(path), STRENGTH, STRENGTH)
    model.patch_model(device_to=CPU)
    try:
        for name, tensor in want_host.named_parameters():
            assert_close(host.get_parameter(name).detach(), tensor.detach().float(), name)
    finally:
        model.unpatch_model(device_to=CPU)
    assert all(torch.equal(p, base[n]) for n, p in host.named_parameters())


def test_comfyui_flux_control_loras_are_read_by_comfyui_itself(comfy, tmp_path) -> None:
    from flux_models import control_file, make_flux

    flux = make_flux()
    path = control_file(tmp_path / "control.safetensors", flux)
    ours, _ = comfyui.load_for_models(flux_patcher(comfy, flux)[0], None, str(path), 0.5, 1.0)
    theirs, _ = comfy.sd.load_lora_for_models(flux_patcher(comfy, flux)[0], None, load_file(str(path)), 0.5, 1.0)
    assert ours.patches.keys() == theirs.patches.keys() and ours.patches
    for key in ours.patches:
        (s1, v1, *rest1), (s2, v2, *rest2) = ours.patches[key][0], theirs.patches[key][0]
        assert s1 == s2 == 0.5 and rest1 == rest2 and type(v1) is type(v2)



# -- PEFT's LoHa / LoKr / OFT / BOFT adapters ----------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["loha_effective_conv", "lokr", "oft_coft_shared", "boft_butterfly", "ia3"])
def test_comfyui_node_applies_peft_tuner_files_like_peft(variant, comfy, sd15, tmp_path) -> None:
    path, want = peft_tuner_expected(tmp_path, sd15, variant)
    base = parameters_by_name(sd15)
    model, clip = node(comfy, *comfy_models(comfy, sd15), path)
    patched(model, clip, lambda: assert_state(sd15, want, base))
    assert_restored(sd15, base)


@pytest.mark.parametrize("variant", ["loha_effective_conv", "lokr", "oft", "boft_butterfly", "ia3"])
def test_comfyuis_own_loader_reads_peft_tuner_files_converted_to_webui(variant, comfy, sd15, tmp_path) -> None:
    """``convert --to webui`` (OFT/BOFT/IA3: ``--checkpoint``, exact diffs) read by ComfyUI's own key map and weight
    adapters gives PEFT's merge. (Not Tucker LoKr, ``lokr_t2``: ComfyUI's own LoKr adapter fails on any such file,
    its ``torch.kron`` of a non-contiguous einsum result; the lora_compat node reads them.)"""
    path, want = peft_tuner_expected(tmp_path, sd15, variant)
    checkpoint = save_checkpoint(tmp_path / "checkpoint", sd15) if variant.startswith(("oft", "boft", "ia3")) else None
    out = tmp_path / "webui.safetensors"
    lora_compat.convert(path, "webui", out, checkpoint=checkpoint)
    base = parameters_by_name(sd15)
    model, clip = comfy.sd.load_lora_for_models(*comfy_models(comfy, sd15), load_file(str(out)), STRENGTH, STRENGTH)
    patched(model, clip, lambda: assert_state(sd15, want, base))
    assert_restored(sd15, base)
