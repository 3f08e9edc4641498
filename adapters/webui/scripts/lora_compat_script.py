"""webui script: installs lora_compat's hooks once the host's LoRA modules are loaded (A1111, SD.Next, Forge),
and registers the setting that turns them off.

Everything here also runs on an API-only server (``--api --nowebui``): A1111 v1.8.0's ``api_only()`` runs the
``before_ui`` and ``model_loaded`` callbacks but never ``ui_settings``, so the setting is registered in
``shared.options_templates`` when this script is imported (as the built-in Lora extension registers its own),
which makes it readable and writable through ``/sdapi/v1/options`` in both modes.
"""
from __future__ import annotations

try:
    from modules import script_callbacks, shared
except ImportError:  # not inside a webui
    script_callbacks = shared = None

SETTING = "lora_compat_enabled"
LABEL = "Read every LoRA dialect with lora_compat (exact math for DoRA, OFT, diffusers/PEFT files...)"


def _install() -> None:
    from lora_compat.adapters import webui

    host = webui.install()
    print(f"[lora_compat] {'hooks installed for ' + host if host else 'no webui LoRA module found'}")


def _register_setting() -> None:
    """The on/off setting, in the options every server mode reads (idempotent): the templates (what the
    settings page and ``POST /sdapi/v1/options`` accept) and the live options' values (what ``GET`` lists)."""
    info = shared.OptionInfo(True, LABEL)
    info.section = ("lora_compat", "lora_compat")
    templates = getattr(shared, "options_templates", None)
    if templates is not None:
        templates[SETTING] = info
    opts = getattr(shared, "opts", None)
    if opts is not None and hasattr(opts, "add_option"):
        opts.add_option(SETTING, info)


def _model_loaded(sd_model) -> None:
    """Row ranges of fused Flux modules come from the loaded model's own shapes."""
    from lora_compat.adapters import webui
    from lora_compat.models import component_modules

    pipe = getattr(sd_model, "pipe", sd_model)
    forge_unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    try:
        if forge_unet is not None:  # Forge: a ComfyUI-style ModelPatcher over BFL / compvis names
            webui.set_model({k: tuple(v.shape) for k, v in forge_unet.model.state_dict().items()})
        elif hasattr(pipe, "components"):  # SD.Next: a diffusers pipeline
            webui.set_model(components=component_modules(pipe))
        else:
            webui.set_model()
    except Exception as exc:  # never break model loading
        print(f"[lora_compat] could not index the loaded model: {exc}")
        webui.set_model()


if script_callbacks is not None:
    _register_setting()
    script_callbacks.on_before_ui(_install)  # the host's own Lora extension has loaded by then, in every mode
    script_callbacks.on_model_loaded(_model_loaded)
