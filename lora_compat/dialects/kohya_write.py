"""Writing kohya-style files: flat module names (``lora_unet_<name>``, ``lora_te1_text_model_...``) with each kind's
kohya/LyCORIS tensors. The kohya dialect writes the ``kohya`` and ``webui`` targets with it, the bfl dialect the
``bfl`` target (BFL names, ``lora_A``/``lora_B`` suffixes), and the host converter
(:func:`lora_compat.hosts.convert.convert_for_host`) names its layouts with :func:`write_names`.

The names are :func:`lora_compat.dialects.kohya_names.kohya_names`, the tables ``kohya_resolver`` reads by, so what is
written reads back to the same canonical targets (``tests/test_dialect_roundtrip.py``).
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..archs import ModuleIndex
from ..deltas import CHECKPOINT_HINT, BaseWeights, module_delta
from ..errors import LoraCompatError
from ..archs.names import HostName
from .kohya_names import fused_module, fused_rows, kohya_names, kohya_tensors
from ..patches import Patch
from ..patchset import PatchSet
from .writing import Written

#: SD.Next's prefixes of the text encoders of a two-encoder model, in the diffusers layout (:func:`sdnext_name`)
TE_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
#: the layouts :func:`write_names` names: the ``convert`` targets ``kohya`` and ``webui``, and the host layouts
#: ``compvis`` (A1111: as ``webui``), ``comfy`` (Forge/ComfyUI) and ``diffusers`` (SD.Next)
LAYOUTS = ("kohya", "webui", "compvis", "comfy", "diffusers")


def write_names(index: ModuleIndex, targets: list[str], layout: str, base: str | None = None
                ) -> dict[str, HostName]:
    """Canonical target → its flat kohya-style name in ``layout`` (see :data:`LAYOUTS`; another value names as
    ``compvis``). ``base``: the base the targets are for (``kohya``: the names sd-scripts writes for its family,
    ``Arch.trainer_names``; ``comfy``: text encoders named as ComfyUI does for that base)."""
    if layout == "diffusers":
        one_text_encoder = "text_encoder_2" not in index.components
        return {t: HostName(sdnext_name(t, one_text_encoder)) for t in targets}
    return kohya_names(index, targets, comfy=layout == "comfy", base=base, trainer=layout == "kohya")


def sdnext_name(target: str, one_text_encoder: bool) -> str:
    """SD.Next's flat name of a diffusers module: ``lora_te_`` for the text encoder of a one-encoder model,
    ``lora_te1_`` / ``lora_te2_`` with two (its ``assign_network_names_to_compvis_modules``)."""
    component, _, path = target.partition(".")
    prefixes = {"unet": "lora_unet_", "transformer": "lora_transformer_", **TE_PREFIXES}
    if one_text_encoder:
        prefixes["text_encoder"] = "lora_te_"
    prefix = prefixes.get(component, f"lora_{component}_")
    if component.startswith("text_encoder") and not path.startswith(("text_model.", "encoder.block.")):
        path = "text_model." + path
    return prefix + path.replace(".", "_")


class KohyaWriter:
    """Every kind keeps its own tensors; parts of a fused Flux module are assembled into one exact LoRA.
    ``suffixes``: kohya suffix → the dialect's own (BFL's ``lora_A.weight``...)."""

    def __init__(self, patchset: PatchSet, index: ModuleIndex, target: str, weights: BaseWeights | None = None,
                 suffixes: Mapping[str, str] | None = None):
        self.patchset, self.index, self.target, self.weights = patchset, index, target, weights
        self.suffixes = dict(suffixes or {})
        self.modules = 0
        self.ranks: list[int] = []

    def write(self, names: Mapping[str, HostName]) -> Written:
        tensors: dict[str, torch.Tensor] = {}
        fused: dict[str, list[tuple[HostName, Patch, str]]] = {}
        for target, patch in self.patchset.items():
            name = names.get(target)
            if name is None:
                raise LoraCompatError(f"{self.patchset.source}: {target} has no name in the {self.target} dialect")
            if name.rows is None and not name.swap:
                self._put(tensors, name.name, patch, target)
            else:
                fused.setdefault(name.name, []).append((name, patch, target))
        for module, parts in fused.items():
            self._put_fused(tensors, module, parts)
        return Written(tensors, self._metadata(), self.modules)

    def _put(self, tensors: dict[str, torch.Tensor], name: str, patch: Patch, target: str) -> None:
        try:
            own = kohya_tensors(patch)
        except ValueError as exc:
            own = self._diff(patch, target, exc)
        self._place(tensors, name, own)
        if patch.rank:
            self.ranks.append(patch.rank)

    def _place(self, tensors: dict[str, torch.Tensor], name: str, own: Mapping[str, torch.Tensor]) -> None:
        for suffix, tensor in own.items():
            tensors[f"{name}.{self.suffixes.get(suffix, suffix)}"] = tensor
        self.modules += 1

    def _diff(self, patch: Patch, target: str, exc: ValueError) -> dict[str, torch.Tensor]:
        """A PEFT OFT/BOFT/IA3 patch (no kohya/LyCORIS form; linear in the strength, like a ``diff``) as its exact
        change of the checkpoint's weights (LyCORIS ``diff`` / ``diff_b``, which every host reads)."""
        if not patch.written_as_diff:
            raise LoraCompatError(f"{self.patchset.source}: {target}: {exc}") from None
        if self.weights is None:
            raise LoraCompatError(f"{self.patchset.source}: {target}: {exc}; it can be written as the exact "
                                  f"change of a checkpoint's weights: {CHECKPOINT_HINT}") from None
        delta, bias = module_delta(patch, self.index, target, self.weights)
        return {"diff": delta.contiguous()} if bias is None else {"diff": delta.contiguous(), "diff_b": bias}

    def _put_fused(self, tensors: dict[str, torch.Tensor], module: str,
                   parts: list[tuple[HostName, Patch, str]]) -> None:
        sources = [p.sliced_from for _, p, _ in parts]
        if all(s is not None for s in sources) and len({id(s) for s in sources}) == 1:
            self._put(tensors, module, sources[0], parts[0][2])  # the fused source patch, unsplit
            return
        _, own = fused_module(module, [(h, p) for h, p, _ in parts], self._fused_rows(module),
                              written=self.patchset.source)
        self._place(tensors, module, own)
        self.ranks.append(int(own["lora_down.weight"].shape[0]))

    def _fused_rows(self, module: str) -> int:
        flat = module[len("lora_unet_"):] if module.startswith("lora_unet_") else module.partition(".")[2]
        rows = fused_rows(self.index, flat)
        if rows is None:
            raise LoraCompatError(f"{module}: not a fused module of this base")
        return rows

    def _metadata(self) -> dict[str, str]:
        if not self.ranks:
            return {}
        return {"ss_network_module": "networks.lora" if self.target != "bfl" else "",
                "ss_network_dim": str(max(self.ranks))}
