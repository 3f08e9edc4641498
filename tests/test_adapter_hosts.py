"""The host adapters' parts that need no host code. Everything a host runs is tested against the real host code in
``tests/hosts`` (run with ``python -m pytest -q tests/hosts --hosts-dir DIR``, DIR holding the pinned host code)."""
from __future__ import annotations

import torch

from lora_compat.adapters import comfyui, webui


class OldSdNextLora:
    """SD.Next before master (issue #3670), whose code is not among the pinned hosts: ``changed()`` returns a
    bare bool and ignores an empty request; ``activate`` restores and re-applies only on a change."""

    def __init__(self, module: torch.nn.Linear, change: torch.Tensor):
        self.module, self.change, self.backup = module, change, module.weight.detach().clone()
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
                self.module.weight.copy_(self.backup + self.change if requested else self.backup)
            self.loaded_networks = list(requested)


def test_empty_request_restores_the_model_on_a_bool_changed() -> None:
    """The seed bug: removing every LoRA left the last one applied. With the fix the bool form stays a bool."""
    module = torch.nn.Linear(4, 3)
    change = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for fixed in (False, True):
        cls = type("Lora", (OldSdNextLora,), {})
        if fixed:
            webui.fix_empty_request(cls)
            webui.fix_empty_request(cls)  # idempotent
        extra = cls(module, change)
        extra.activate(["lora:1:1"])
        assert not torch.equal(module.weight, extra.backup)
        extra.activate(["lora:1:1"])  # unchanged request: nothing to do
        assert extra.changed(["lora:1:1"]) is False
        extra.activate([])
        assert torch.equal(module.weight, extra.backup) is fixed  # the host alone keeps the LoRA applied
        with torch.no_grad():
            module.weight.copy_(extra.backup)


def test_comfyui_nodes_are_registered() -> None:
    assert comfyui.NODE_DISPLAY_NAME_MAPPINGS == {"LoraCompatLoader": "Load LoRA (lora_compat)",
                                                  "LoraCompatInfo": "LoRA info (lora_compat)"}
    node = comfyui.NODE_CLASS_MAPPINGS["LoraCompatLoader"]
    assert (node.RETURN_TYPES, node.FUNCTION) == (("MODEL", "CLIP"), "load_lora")
