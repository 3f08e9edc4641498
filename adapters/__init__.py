"""Host integrations for lora_compat (diffusers, webui, ComfyUI). Filled in by later releases."""
