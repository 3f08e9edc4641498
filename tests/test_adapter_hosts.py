"""The webui (A1111, SD.Next, Forge) and ComfyUI adapters, driven through test doubles of each host's contract
(`host_doubles.py`) with real-format files: what each host would apply equals ``patched_weights``."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat.adapters import comfyui, webui
from lora_compat.archs.sd import sgm_aliases

import host_doubles as hd
from lora_compat.oracles.lycoris_oracle import ALGOS, write_lycoris_file
from lora_compat.oracles.models import make_sd15_components
from lora_compat.oracles.peft_oracle import write_peft_file
from test_flux import PARTIAL, control_file, diffusers_file, kohya_flux_file, make_bfl_host, make_flux

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)
STRENGTH = 0.7
SD_FILES = [("lycoris", v) for v in ALGOS] + [("peft", v) for v in ("diffusers", "diffusers_dora", "diffusers_legacy",
                                                                   "kohya_from_diffusers")]


@pytest.fixture(scope="module")
def sd15():
    return make_sd15_components(seed=100)


@pytest.fixture(scope="module")
def sd_files(sd15, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("host-files")
    files = {}
    for library, variant in SD_FILES:
        (root / variant).mkdir()
        writer = write_lycoris_file if library == "lycoris" else write_peft_file
        files[variant] = writer(root / variant, sd15, variant)[0]
    return files


class Change(dict):
    """``patched_weights`` keyed ``<component>.<parameter>``, with the base values next to it."""

    def __init__(self, new: dict, base: dict):
        super().__init__(new)
        self.base = base


def expected_deltas(path: Path, components: dict, strength: float) -> Change:
    new = lora_compat.patched_weights(path, components, strength)
    params = {f"{c}.{n}": p.detach() for c, m in components.items() for n, p in m.named_parameters()}
    return Change({k: v.float() for k, v in new.items()}, {k: params[k].float() for k in new})


def assert_close(got_change: torch.Tensor, want: Change | torch.Tensor, what: str, base: torch.Tensor | None = None
                 ) -> None:
    """The host's weight (base + its change) equals ``patched_weights`` (fp32 rel. error < 1e-5)."""
    got = got_change.float() + base if base is not None else got_change.float()
    assert float((got - want).norm()) / max(float(want.norm()), 1e-12) < 1e-5, what


# -- A1111 and SD.Next -------------------------------------------------------------------------------------------
def a1111_layout(components: dict) -> tuple[dict, dict, callable]:
    """network_layer_mapping (compvis flat names → module), diffusers name of each, and the host's name
    conversion for kohya keys (diffusers-style ``lora_unet_down_blocks_...`` → compvis, as
    ``convert_diffusers_name_to_compvis`` does)."""
    unet, te = components["unet"], components["text_encoder"]
    mapping, names, kohya_to_compvis = {}, {}, {}
    for sgm, path in sgm_aliases(dict(unet.named_modules())).items():
        flat = "diffusion_model_" + sgm.replace(".", "_")
        mapping[flat], names[flat] = unet.get_submodule(path), f"unet.{path}"
        kohya_to_compvis["lora_unet_" + path.replace(".", "_")] = flat
    for path, module in te.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            flat = "transformer_text_model_" + path.replace(".", "_")
            mapping[flat], names[flat] = module, f"text_encoder.{path}"

    def convert_name(prefix: str) -> str:
        if prefix in kohya_to_compvis:
            return kohya_to_compvis[prefix]
        return prefix.replace("lora_unet_", "diffusion_model_", 1).replace("lora_te_text_model_",
                                                                           "transformer_text_model_", 1)
    return mapping, names, convert_name


def sdnext_layout(components: dict) -> tuple[dict, dict, callable]:
    """SD.Next names the diffusers modules themselves: ``lora_unet_<path>``, ``lora_te_text_model_<path>``,
    ``lora_transformer_<path>``."""
    mapping, names = {}, {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "transformer": "lora_transformer_"}
    for component, root in components.items():
        for path, module in root.named_modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            flat_path = ("text_model." + path if component == "text_encoder" else path).replace(".", "_")
            mapping[prefixes[component] + flat_path], names[prefixes[component] + flat_path] = \
                module, f"{component}.{path}"
    return mapping, names, lambda prefix: prefix.replace("lora_te_", "lora_te1_", 1)


def run_webui(host: str, components: dict, path: Path, strength: float) -> dict[str, torch.Tensor]:
    """Load a file through the double with lora_compat installed; the change each module would apply."""
    network = hd.make_network_module()
    mapping, names, convert_name = (a1111_layout if host == "a1111" else sdnext_layout)(components)
    networks = hd.make_networks(network, mapping, convert_name)
    if host == "a1111":
        webui.install_a1111(networks, network)
        webui.install_a1111(networks, network)  # idempotent
        assert sum(getattr(t, "lora_compat", False) for t in networks.module_types) == 1
    else:
        common = type("common", (), {"module_types": networks.module_types})
        load = type("load", (), {"load_safetensors": staticmethod(lambda name, on_disk: None),
                                 "sd_models": networks.sd_models})
        webui.install_sdnext(common, load, network)
        webui.install_a1111(networks, network, host="sdnext")
    net = networks.load_network(path.stem, hd.NetworkOnDisk(str(path)))
    net.te_multiplier = net.unet_multiplier = strength  # load_networks sets them after loading
    assert not networks.failed[path.stem], networks.failed[path.stem][:5]
    changes = {}
    for sd_key, module in net.modules.items():
        assert module.calc_updown is not network.NetworkModule.calc_updown
        weight_change, bias_change = module.calc_updown(module.sd_module.weight)
        changes[f"{names[sd_key]}.weight"] = weight_change
        if bias_change is not None:
            changes[f"{names[sd_key]}.bias"] = bias_change
    return changes


@pytest.mark.parametrize("host", ["a1111", "sdnext"])
@pytest.mark.parametrize("variant", [v for _, v in SD_FILES])
def test_webui_updown_equals_patched_weights(host: str, variant: str, sd15, sd_files) -> None:
    path = sd_files[variant]
    want = expected_deltas(path, sd15, STRENGTH)
    got = run_webui(host, sd15, path, STRENGTH)
    nonzero = {k for k, v in got.items() if float(v.abs().max()) > 0}
    assert nonzero <= set(want) and set(want) <= set(got), (sorted(set(want) - set(got))[:3], sorted(nonzero - set(want))[:3])
    for key, new in want.items():
        assert_close(got[key], new, key, base=want.base[key])


@pytest.mark.parametrize("kind", ["partial", "kohya"])
def test_sdnext_flux_files(kind: str, tmp_path: Path) -> None:
    """SD.Next names the diffusers Flux modules (``lora_transformer_``): diffusers files with partial q/k/v and
    kohya files with fused qkv/linear1 arrive split exactly."""
    model = make_flux()
    path = (diffusers_file(tmp_path / "f.safetensors", model, PARTIAL) if kind == "partial"
            else kohya_flux_file(tmp_path / "f.safetensors", model))
    components = {"transformer": model}
    webui.set_model(components=components)  # what the script does on model load
    try:
        want = expected_deltas(path, components, STRENGTH)
        got = run_webui("sdnext", components, path, STRENGTH)
    finally:
        webui.set_model()
    assert set(want) <= set(got)
    for key, new in want.items():
        assert_close(got[key], new, key, base=want.base[key])


def _sdnext_extra_network(module: torch.nn.Linear, change: torch.Tensor):
    """SD.Next's bookkeeping as of issue #3670: ``changed()`` ignores an empty request; ``activate`` restores
    the backup and re-applies only when ``changed()`` says so."""
    backup = module.weight.detach().clone()

    class ExtraNetworkLora:
        def __init__(self):
            self.loaded, self.loaded_networks = [], []

        def changed(self, requested):
            if len(requested) == 0:
                return False
            if requested != self.loaded:
                self.loaded = list(requested)
                return True
            return False

        def activate(self, requested):
            if self.changed(requested):
                with torch.no_grad():
                    module.weight.copy_(backup)  # deactivate the previous set
                    if requested:
                        module.weight.copy_(backup + change)
                self.loaded_networks = list(requested)

    return ExtraNetworkLora, backup


def test_sdnext_empty_request_restores_the_model(sd15, sd_files) -> None:
    """The seed bug: removing every LoRA left the last one applied. With the extension it restores."""
    changes = run_webui("sdnext", sd15, sd_files["lora"], 1.0)
    key = next(k for k in changes if k.startswith("unet.") and k.endswith(".weight") and changes[k].dim() == 2)
    module = torch.nn.Linear(changes[key].shape[1], changes[key].shape[0])
    for fixed in (False, True):
        cls, backup = _sdnext_extra_network(module, changes[key])
        if fixed:
            webui.fix_empty_request(cls)
            webui.fix_empty_request(cls)  # idempotent
        extra = cls()
        extra.activate(["lora:1:1"])
        assert not torch.equal(module.weight, backup)
        extra.activate(["lora:1:1"])  # unchanged request: nothing to do
        extra.activate([])
        assert torch.equal(module.weight, backup) is fixed  # the host alone keeps the LoRA applied
        with torch.no_grad():
            module.weight.copy_(backup)


def test_webui_setting_turns_the_extension_off(sd15, sd_files, monkeypatch) -> None:
    network = hd.make_network_module()
    mapping, names, convert_name = a1111_layout(sd15)
    networks = hd.make_networks(network, mapping, convert_name)
    webui.install_a1111(networks, network)
    monkeypatch.setattr(webui, "enabled", lambda: False)
    path = sd_files["lora"]
    net = networks.load_network("x", hd.NetworkOnDisk(str(path)))
    assert all(type(m) is network.NetworkModule for m in net.modules.values())  # the host's own type


def test_webui_unmatched_keys_are_reported_loudly(tmp_path: Path, sd15, capsys) -> None:
    path, _ = write_peft_file(tmp_path, sd15, "diffusers")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["unet.not_a_module.lora_A.weight"] = torch.zeros(2, 4)
    tensors["unet.not_a_module.lora_B.weight"] = torch.zeros(4, 2)
    save_file(tensors, str(tmp_path / "extra.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    run_webui("a1111", sd15, tmp_path / "extra.safetensors", 1.0)
    err = capsys.readouterr().err
    assert "[lora_compat] extra.safetensors: 2 keys match no module" in err and "not_a_module" in err


# -- ComfyUI and Forge -----------------------------------------------------------------------------------------
def comfy_sd_models(components: dict) -> tuple[hd.Patcher, hd.Patcher, dict[str, str]]:
    """ModelPatcher doubles over the diffusers modules' tensors under ComfyUI's names, and diffusers name →
    ComfyUI name."""
    unet, te = components["unet"], components["text_encoder"]
    unet_params, clip_params, names = {}, {}, {}
    for sgm, path in sgm_aliases(dict(unet.named_modules())).items():
        for param, tensor in unet.get_submodule(path).named_parameters(recurse=False):
            unet_params[f"diffusion_model.{sgm}.{param}"] = tensor.detach()
            names[f"unet.{path}.{param}"] = f"diffusion_model.{sgm}.{param}"
    for path, module in te.named_modules():
        for param, tensor in module.named_parameters(recurse=False):
            clip_params[f"clip_l.transformer.text_model.{path}.{param}"] = tensor.detach()
            names[f"text_encoder.{path}.{param}"] = f"clip_l.transformer.text_model.{path}.{param}"
    return hd.Patcher(hd.StateModel(unet_params)), hd.Patcher(hd.StateModel(clip_params)), names


def run_comfy(model, clip, path: Path, strength: float, forge: bool = False) -> dict[str, torch.Tensor]:
    if forge:
        networks, backend = hd.make_forge()
        weights = {**model.model.params, **(clip.cond_stage_model.params if clip is not None else {})}
        webui.install_forge(networks, backend, weights.get)
        new_model, new_clip = networks.load_networks(str(path), model, clip, strength, strength)
        calculators = backend.extra_weight_calculators
    else:
        new_model, new_clip = comfyui.load_for_models(model, clip, str(path), strength, strength, hd.make_comfy())
        calculators = {}
    patched = new_model.patched(calculators)
    if new_clip is not None:
        patched.update(new_clip.patched(calculators))
    return patched


@pytest.mark.parametrize("host", ["comfyui", "forge"])
@pytest.mark.parametrize("variant", [v for _, v in SD_FILES])
def test_comfy_style_hosts_equal_patched_weights_sd(host: str, variant: str, sd15, sd_files) -> None:
    path = sd_files[variant]
    model, clip, names = comfy_sd_models(sd15)
    base = {**model.model.params, **clip.cond_stage_model.params}
    want = {names[k]: v for k, v in expected_deltas(path, sd15, STRENGTH).items()}
    got = run_comfy(model, clip, path, STRENGTH, forge=host == "forge")
    changed = {k for k, v in got.items() if not torch.equal(v, base[k])}
    assert changed <= set(want) and set(want) <= set(got), (sorted(set(want) - set(got))[:3],
                                                           sorted(changed - set(want))[:3])
    for key, new in want.items():
        assert_close(got[key], new, key)


@pytest.mark.parametrize("host", ["comfyui", "forge"])
@pytest.mark.parametrize("kind", ["kohya", "partial"])
def test_comfy_style_hosts_equal_patched_weights_flux(host: str, kind: str, tmp_path: Path) -> None:
    """Flux on a BFL-named host: fused q/k/v LoRAs assembled exactly (block-diagonal for split sources,
    zero rows for absent parts), the adaLN half swap, from the host model's own shapes."""
    model = make_flux()
    path = (diffusers_file(tmp_path / "f.safetensors", model, PARTIAL) if kind == "partial"
            else kohya_flux_file(tmp_path / "f.safetensors", model))
    host_model = make_bfl_host(model)
    params = {f"diffusion_model.{n}": p.detach() for n, p in host_model.named_parameters()}
    expected_host = make_bfl_host(model)
    lora_compat.Patcher({"transformer": expected_host}).set([(path, STRENGTH)])
    if host == "forge":
        webui.set_model(state_dict_shapes={k: tuple(v.shape) for k, v in params.items()})
    try:
        got = run_comfy(hd.Patcher(hd.StateModel(params)), None, path, STRENGTH, forge=host == "forge")
    finally:
        webui.set_model()
    for name, tensor in expected_host.named_parameters():
        key = f"diffusion_model.{name}"
        assert_close(got.get(key, params[key]), tensor.detach().float(), key)


def test_comfyui_hands_flux_control_loras_to_comfyui_unchanged(tmp_path: Path) -> None:
    model = make_flux()
    path = control_file(tmp_path / "control.safetensors", model)
    seen = {}
    comfy = hd.make_comfy()
    comfy["comfy.sd"].load_lora_for_models = lambda m, c, lora, sm, sc: seen.update(lora=lora, s=(sm, sc)) or (m, c)
    params = {f"diffusion_model.{n}": p.detach() for n, p in make_bfl_host(model).named_parameters()}
    comfyui.load_for_models(hd.Patcher(hd.StateModel(params)), None, str(path), 0.5, 1.0, comfy)
    from safetensors.torch import load_file

    raw = load_file(str(path))
    assert seen["s"] == (0.5, 1.0) and seen["lora"].keys() == raw.keys()
    assert all(torch.equal(seen["lora"][k], raw[k]) for k in raw)


def test_comfyui_nodes_are_registered() -> None:
    assert comfyui.NODE_DISPLAY_NAME_MAPPINGS == {"LoraCompatLoader": "Load LoRA (lora_compat)",
                                                  "LoraCompatInfo": "LoRA info (lora_compat)"}
    node = comfyui.NODE_CLASS_MAPPINGS["LoraCompatLoader"]
    assert (node.RETURN_TYPES, node.FUNCTION) == (("MODEL", "CLIP"), "load_lora")


def test_forge_converts_a_file_once_per_version(sd15, sd_files) -> None:
    """Forge reads the LoRA file at every generation: the conversion (and its patch ids) is reused."""
    model, clip, _ = comfy_sd_models(sd15)
    path = sd_files["diag_oft"]  # a kind Forge lacks: it becomes lora_compat patches
    first = run_comfy(model, clip, path, STRENGTH, forge=True)
    count = len(webui.FORGE_PATCHES)
    second = run_comfy(model, clip, path, STRENGTH, forge=True)
    assert len(webui.FORGE_PATCHES) == count
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
