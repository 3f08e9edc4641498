"""Writing diffusers and PEFT files: ``lora_A``/``lora_B`` (+ ``lora_B.bias``, PEFT DoRA's
``lora_magnitude_vector``) under canonical names, the scales in ``lora_adapter_metadata`` (diffusers) or the
PEFT config (``base_model.model.`` names). Both hold LoRA and PEFT DoRA only: other kinds are refused, or with
``rank`` compressed by truncated SVD of each delta.

``scale_in_up`` writes what diffusers' ``load_lora_weights`` takes from a state dict (the diffusers adapter's
route): the rank scale folded into ``lora_B``, no metadata, plain LoRA only.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from ..archs import ModuleIndex
from ..deltas import BaseWeights, module_delta
from ..errors import LoraCompatError
from ..patches import Patch
from ..patchset import PatchSet
from .writing import Written, svd_factors


class LoraWriter:
    """One PatchSet as ``diffusers`` or ``peft`` tensors; ``index``: the modules' shapes (``None`` with
    ``scale_in_up``, where the patches' own shapes are the pipeline's). ``model_prefix``: the modules are named
    by their path in one model after this prefix (PEFT's ``base_model.model.``) instead of canonically."""

    def __init__(self, patchset: PatchSet, index: ModuleIndex | None, target: str, rank: int | None = None,
                 weights: BaseWeights | None = None, scale_in_up: bool = False, model_prefix: str | None = None):
        self.patchset, self.index, self.target, self.rank, self.weights = patchset, index, target, rank, weights
        self.scale_in_up, self.model_prefix = scale_in_up, model_prefix
        self.configs: dict[str, dict[str, Any]] = {}
        self.svd_errors: dict[str, float] = {}
        self._error_sums = [0.0, 0.0]

    def write(self) -> Written:
        components = sorted({t.partition(".")[0] for t in self.patchset})
        if self.model_prefix is not None and len(components) > 1:
            raise LoraCompatError(f"{self.patchset.source}: a PEFT adapter holds one model; this LoRA patches "
                                  f"{', '.join(components)} (use --to diffusers)")
        tensors: dict[str, torch.Tensor] = {}
        for target, patch in self.patchset.items():
            if self.scale_in_up:
                target = target.removesuffix(".base_layer")  # a module PEFT already wraps: address the wrapper
            component, _, path = target.partition(".")
            key = target if self.model_prefix is None else self.model_prefix + path
            up, down, alpha, extra = self._pipeline_factors(target, patch) if self.scale_in_up else \
                self._factors(target, patch)
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
            for suffix, tensor in extra.items():
                tensors[f"{key}.{suffix}"] = tensor
            if not self.scale_in_up:
                self._configure(component, path, int(down.shape[0]), alpha, extra)
        written = Written(tensors, {} if self.scale_in_up else self._metadata(), len(self.patchset),
                          self.svd_errors)
        if self.svd_errors:
            written.overall_error = math.sqrt(self._error_sums[0] / self._error_sums[1]) if self._error_sums[1] \
                else 0.0
        return written

    def _pipeline_factors(self, target: str, patch: Patch) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
        low_rank = patch.low_rank()
        if low_rank is None:
            raise LoraCompatError(f"{self.patchset.source}: {target} is a {patch.kind} patch, not a plain LoRA")
        down, up = low_rank.peft_factors()
        scale = low_rank.scale.value()
        extra = {} if low_rank.bias is None else {"lora_B.bias": low_rank.bias.load() * scale}
        # down as stored (PEFT copies it into its own parameter); the scale is folded into up in fp32
        return (up if scale == 1.0 else torch.mul(up.float(), scale)), down, float(low_rank.rank), extra

    def _factors(self, target: str, patch: Patch) -> tuple[torch.Tensor, torch.Tensor, float, dict]:
        extra: dict[str, torch.Tensor] = {}
        peft = patch.peft_lora()
        if peft is not None:
            low_rank, magnitude = peft
            if magnitude is not None:
                extra["lora_magnitude_vector"] = magnitude.loader()
            scale = low_rank.scale.value()
            if low_rank.bias is not None:
                extra["lora_B.bias"] = low_rank.bias.load() * scale
            shapes = (self.index.shapes(target) if self.index is not None else None) or {}
            # a module shape the patch does not fit is not the real one (a smaller model than the table's):
            # the file's own shapes decide then
            weight = shapes.get("weight") if shapes and patch.misfit(shapes) is None else None
            down, up = low_rank.peft_factors(weight)
            return up, down, scale * low_rank.rank, extra
        if self.rank is None:
            raise LoraCompatError(f"{self.patchset.source}: {target} is a {patch.kind} patch, which the {self.target} "
                                  f"dialect cannot hold; pass rank=R (--rank R) to compress it to a LoRA by SVD")
        if self.index is None:
            raise LoraCompatError(f"{self.patchset.source}: {target}: compressing needs the modules' index")
        weight, bias = module_delta(patch, self.index, target, self.weights)
        delta = weight.reshape(weight.shape[0], -1)
        up, down, error = svd_factors(delta, self.rank)
        if weight.dim() == 4:  # a conv LoRA: down is the kernel, up a 1x1 conv
            down, up = down.reshape(down.shape[0], *weight.shape[1:]), up.reshape(*up.shape, 1, 1)
        if bias is not None:  # carried exactly (scale alpha/rank = 1)
            extra["lora_B.bias"] = bias
        norm = float(delta.norm())
        self.svd_errors[target] = error
        self._error_sums[0] += (error * norm) ** 2
        self._error_sums[1] += norm ** 2
        return up, down, float(down.shape[0]), extra

    def _configure(self, component: str, path: str, rank: int, alpha: float, extra: dict) -> None:
        config = self.configs.setdefault(component, {"rank_pattern": {}, "alpha_pattern": {}, "target_modules": [],
                                                     "use_dora": False, "lora_bias": False})
        config["rank_pattern"][path] = rank
        config["alpha_pattern"][path] = alpha
        config["target_modules"].append(path)
        config["use_dora"] |= "lora_magnitude_vector" in extra
        config["lora_bias"] |= "lora_B.bias" in extra

    def _metadata(self) -> dict[str, str]:
        flat: dict[str, Any] = {}
        for component, config in self.configs.items():
            ranks = config["rank_pattern"]
            default_rank = max(set(ranks.values()), key=list(ranks.values()).count)
            peft = {"r": default_rank, "lora_alpha": float(default_rank), "rank_pattern": ranks,
                    "alpha_pattern": config["alpha_pattern"], "target_modules": sorted(config["target_modules"]),
                    "use_dora": config["use_dora"], "lora_bias": config["lora_bias"], "use_rslora": False}
            if self.model_prefix is not None:
                peft.update({"peft_type": "LORA", "bias": "none", "init_lora_weights": True})
                return {"lora_compat.peft_config": json.dumps(peft)}
            for key, value in peft.items():
                flat[f"{component}.{key}"] = value
        return {"lora_adapter_metadata": json.dumps(flat)} if flat else {}
