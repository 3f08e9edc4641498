"""What each host does with a LoRA file once lora_compat's adapter is installed, measured by running the
adapters' own decisions on it: the host columns of the compatibility matrix (``lora-compat matrix``).

The matrix (``lora_compat.tools.matrix``) imports no adapter; the CLI hands it :func:`host_routes`. Each column comes
from the code the adapter runs when the host loads the file:

- diffusers: ``adapters.diffusers.choose_route`` on the file's patches;
- A1111 / SD.Next: the conversion the webui adapter's read wrapper makes (``compvis`` / ``diffusers`` names);
  every converted module is then computed by its module type;
- Forge: ``webui.forge_reads_itself``, else ``webui.forge_split`` of the ``comfy`` conversion (native tensors
  for Forge, the rest through lora_compat's weight calculator);
- ComfyUI: ``comfyui.comfy_reads_itself``, else ``comfyui.split_for_comfy`` of the same conversion.

What a host does by itself, where no adapter code decides, is in :data:`HOST_FACTS` (among them the families A1111
and Forge have no model for: their column says so whatever the adapters would do): read from the pinned host
sources (shared/hosts) and re-measured against the real host code by ``tests/hosts`` (``test_a1111_fact_*``,
``test_forge_fact_*``, ``test_comfyui_flux_control_loras_are_read_by_comfyui_itself``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_compat.errors import LoraCompatError
from lora_compat.hosts.convert import Conversion, convert_for_host
from lora_compat.tools.matrix import RouteQuery

from . import comfyui, webui
from .diffusers_load import choose_route


@dataclass(frozen=True)
class HostFact:
    cell: str
    #: where the host's own code says so (pinned copies in shared/hosts)
    source: str


HOST_NAMES = {"a1111": "AUTOMATIC1111", "forge": "Forge"}
#: the families each pinned webui has no model for (base → name): it cannot load the model, so no LoRA of it
NO_MODEL: dict[str, dict[str, str]] = {
    "a1111": {"wan": "Wan", "qwen-image": "Qwen-Image", "flux2": "FLUX.2", "z-image": "Z-Image",
              "lumina2": "Lumina 2", "chroma": "Chroma", "sd3": "SD3"},
    "forge": {"wan": "Wan", "qwen-image": "Qwen-Image", "flux2": "FLUX.2", "z-image": "Z-Image",
              "lumina2": "Lumina 2"},
}
NO_MODEL_SOURCES = {
    "a1111": "AUTOMATIC1111 v1.8.0 (bef51aed) extensions-builtin/Lora/networks.py: layer names come from the loaded "
             "SD model only; v1.8.0 loads SD1/SD2/SDXL checkpoints, no {} model",
    "forge": "Forge (dfdcbab6) backend/loader.py (upstream at the pinned commit; not copied to shared/hosts): "
             "possible_models = SD1.5, SD2, SDXL (+ refiner), SD3, Chroma, Flux; no {} model, so no LoRA of it is "
             "ever applied",
}
#: (host, base or dialect) → what the host does by itself
HOST_FACTS: dict[tuple[str, str], HostFact] = {
    ("a1111", "flux1"): HostFact(
        "refused: AUTOMATIC1111 has no Flux",
        "AUTOMATIC1111 v1.8.0 (bef51aed) extensions-builtin/Lora/networks.py: layer names come from the loaded SD "
        "model only (assign_network_names_to_compvis_modules); a FLUX.1 LoRA matches none of them"),
    **{(host, base): HostFact(f"refused: {HOST_NAMES[host]} has no {name}", NO_MODEL_SOURCES[host].format(name))
       for host, families in NO_MODEL.items() for base, name in families.items()},
    ("forge", "bfl-control"): HostFact(
        "works: Forge reads Control LoRAs itself",
        "Forge (dfdcbab6) packages_3rdparty/comfyui_lora_collection/lora.py load_lora: convert_lora_bfl_control "
        "(lora_B.bias -> diff_b, norm scales -> set_weight); backend/patcher/lora.py pads the widened img_in"),
    ("comfyui", "bfl-control"): HostFact(
        "works: handed to ComfyUI's own Control LoRA loader",
        "ComfyUI (a125cd84) comfy/lora_convert.py convert_lora_bfl_control, comfy/lora.py load_lora"),
}


def _converted(file: Any, layout: str) -> Conversion | str:
    try:
        return convert_for_host(file, layout)
    except LoraCompatError as exc:  # the adapters print this and leave the file to the host's own reader
        return f"refused: lora_compat cannot name it for the host ({exc}); the host reads it itself"


def host_routes(query: RouteQuery) -> dict[str, str]:
    """Host → ``works: ...`` / ``refused: ...`` for one file whose base is known."""
    route = choose_route(query.patchset)
    hosts = {"diffusers": "works: " + {"diffusers": "diffusers route (PEFT LoRA)", "peft": "PEFT LoHa route",
                                       "patcher": "patcher route (exact merge)"}[route]}
    fact = HOST_FACTS.get(("a1111", query.base))
    if fact is not None:
        hosts["a1111"] = fact.cell
    else:
        compvis = _converted(query.file, "compvis")
        hosts["a1111"] = compvis if isinstance(compvis, str) else "works: lora_compat module type"
    flat = _converted(query.file, "diffusers")
    hosts["sdnext"] = flat if isinstance(flat, str) else "works: lora_compat module type (diffusers names)"
    comfy = _converted(query.file, "comfy")
    if isinstance(comfy, str):
        hosts["forge"] = hosts["comfyui"] = comfy
    else:
        hosts["forge"], hosts["comfyui"] = _forge(comfy), _comfyui(comfy)
    if ("forge", query.base) in HOST_FACTS:  # a family Forge has no model for
        hosts["forge"] = HOST_FACTS[("forge", query.base)].cell
    return hosts


def _forge(comfy: Conversion) -> str:
    if webui.forge_reads_itself(comfy):
        return HOST_FACTS[("forge", comfy.dialect)].cell
    _, own = webui.forge_split(comfy)
    return "works: " + ("lora_compat patches (exact)" if own else "native patches")


def _comfyui(comfy: Conversion) -> str:
    if comfyui.comfy_reads_itself(comfy):
        return HOST_FACTS[("comfyui", comfy.dialect)].cell
    _, own = comfyui.split_for_comfy(comfy)
    return "works: " + ("exact diffs at the chosen strength" if own else "native patches")
