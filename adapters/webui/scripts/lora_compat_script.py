"""webui script: installs lora_compat's hooks once the host's LoRA modules are loaded (A1111, SD.Next, Forge),
and adds a settings entry to turn them off."""
from __future__ import annotations

try:
    from modules import script_callbacks, shared
except ImportError:  # not inside a webui
    script_callbacks = shared = None


def _install() -> None:
    from lora_compat.adapters import webui

    host = webui.install()
    print(f"[lora_compat] {'hooks installed for ' + host if host else 'no webui LoRA module found'}")


def _settings() -> None:
    section = ("lora_compat", "lora_compat")
    shared.opts.add_option("lora_compat_enabled", shared.OptionInfo(
        True, "Read every LoRA dialect with lora_compat (exact math for DoRA, OFT, diffusers/PEFT files...)",
        section=section))


def _model_loaded(sd_model) -> None:
    """Row ranges of fused Flux modules come from the loaded model's own shapes."""
    from lora_compat.adapters import webui
    from lora_compat.apply import component_modules

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
    script_callbacks.on_before_ui(_install)  # the host's own Lora extension has loaded by then
    script_callbacks.on_ui_settings(_settings)
    script_callbacks.on_model_loaded(_model_loaded)
