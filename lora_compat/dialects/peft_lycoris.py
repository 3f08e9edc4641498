"""PEFT's own LyCORIS-family tuners: LoHa, LoKr, OFT, BOFT and IA³ adapters.

Two layouts, both written by peft's ``get_peft_model_state_dict``:

- ``PeftModel.save_pretrained``: ``base_model.model.<module>.<parameter>`` with ``adapter_config.json`` beside
  the file (``peft_type`` LOHA/LOKR/OFT/BOFT/IA3 and the fields below);
- diffusers ``save_lora_weights`` of a component that had ``add_adapter(LoHaConfig(...))``:
  ``unet.`` / ``text_encoder(_2).`` / ``transformer.`` + module + parameter, the config per component in the
  ``lora_adapter_metadata`` header entry (``unet.r``, ``unet.alpha``, ``unet.peft_type``...).

LoHa and LoKr use LyCORIS' tensor names and math (:class:`LohaPatch`, :class:`LokrPatch`), but the scale is
``alpha / r`` from the config (``rank_pattern`` / ``alpha_pattern`` per module), for LoKr even when both factors
are full (LyCORIS and the webuis use 1 there: that scale is folded into ``lokr_w1``, so a converted file reads
the same everywhere). OFT (``oft_R.weight``) and BOFT (``boft_R``, ``boft_s``) rotate the input columns with
PEFT's own parameterisation: kinds ``peft_oft`` and ``peft_boft``. IA³ (``ia3_l``, the factor itself, bias scaled
too) is ``peft_ia3``; ``feedforward_modules`` of the config tells which side it scales.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Callable, Mapping

from ..archs import ModuleIndex
from ..files import Header, LoraFile
from ..patches import LohaPatch, LokrPatch, Patch, Ref, Scale
from ..patches.base import ONE
from ..patches.peft_boft import PeftBoftPatch
from ..patches.peft_ia3 import PeftIa3Patch
from ..patches.peft_oft import OftSettings, PeftOftPatch
from ..patchset import PatchSet
from .base import Dialect, Match
from .peft import BASE_CLASS_COMPONENT, PREFIX, load_adapter_config
from .peft_scaling import metadata_configs, pattern_value

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
#: tensor name (PEFT's ``adapter_layer_names``; ``oft_R`` is a module holding ``weight``) → peft_type
PARAMS = {**dict.fromkeys(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), "LOHA"),
          **dict.fromkeys(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
                          "LOKR"),
          "oft_R": "OFT", "boft_R": "BOFT", "boft_s": "BOFT", "ia3_l": "IA3"}
NAMES = {"LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT", "BOFT": "BOFT", "IA3": "IA3"}


def split_tuner_key(key: str) -> tuple[str, str, str] | None:
    """``(component or "", module path, parameter)`` of a PEFT LoHa/LoKr/OFT/BOFT/IA³ key (``""``: a
    ``base_model.model.`` key, whose component the config tells); an adapter name ``default`` is dropped."""
    if key.startswith(PREFIX):
        component, rest = "", key[len(PREFIX):]
    else:
        component, _, rest = key.partition(".")
        if component not in COMPONENTS:
            return None
    parts = [p for p in rest.split(".") if p != "default"]
    if len(parts) >= 2 and parts[-1] in PARAMS and parts[-1] != "oft_R":
        return component, ".".join(parts[:-1]), parts[-1]
    if len(parts) >= 3 and parts[-2] == "oft_R" and parts[-1] == "weight":
        return component, ".".join(parts[:-2]), "oft_R"
    return None


def _scale(config: Mapping[str, Any] | None, path: str) -> Scale:
    """PEFT's ``alpha / r`` of one module (``get_pattern_key`` on its path); no config: scale 1."""
    if config is None:
        return ONE
    r = int(pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8)))
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, path, config.get("alpha", 8)))
    return Scale(alpha, r)


def oft_settings(config: Mapping[str, Any] | None) -> OftSettings:
    """The OFTConfig fields of the merge; PEFT's defaults for the ones the config lacks."""
    config, default = config or {}, OftSettings()
    return OftSettings(bool(config.get("use_cayley_neumann", default.use_cayley_neumann)),
                       int(config.get("num_cayley_neumann_terms", default.num_cayley_neumann_terms)),
                       bool(config.get("coft", default.coft)), float(config.get("eps", default.eps)))


def feedforward(config: Mapping[str, Any] | None, path: str) -> bool | None:
    """PEFT's ``_check_target_module_feedforward`` (a regex ``fullmatch`` or the end of the path); no config:
    ``None`` (the shapes decide)."""
    if config is None or "feedforward_modules" not in config:
        return None
    modules = config["feedforward_modules"] or []
    if isinstance(modules, str):
        return bool(re.fullmatch(modules, path))
    return any(path.endswith(key) for key in modules)


def build(tuner: str, refs: Mapping[str, Ref], config: Mapping[str, Any] | None, path: str) -> Patch:
    """The patch of one module's tensors; ``ValueError`` naming what is missing."""
    def need(*names: str) -> list[Ref]:
        missing = [n for n in names if n not in refs]
        if missing:
            raise ValueError(f"PEFT {NAMES[tuner]} needs {', '.join(missing)}")
        return [refs[n] for n in names]

    flat = sorted(n for n, ref in refs.items() if n.startswith(("hada_", "lokr_")) and len(ref.shape) < 2)
    if flat:
        raise ValueError("too few dimensions for a factor: " + ", ".join(f"{n} {list(refs[n].shape)}" for n in flat))

    if tuner == "LOHA":
        w1a, w1b, w2a, w2b = need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if ("hada_t1" in refs) != ("hada_t2" in refs):
            raise ValueError("PEFT LoHa needs both hada_t1 and hada_t2 or neither")
        return LohaPatch(w1a, w1b, w2a, w2b, _scale(config, path), refs.get("hada_t1"),
                         refs.get("hada_t2"))
    if tuner == "LOKR":
        return _lokr(refs, _scale(config, path))
    if tuner == "OFT":
        (params,) = need("oft_R")
        shared = bool(config["block_share"]) if config and "block_share" in config else None
        return PeftOftPatch(params, oft_settings(config), shared)
    if tuner == "IA3":
        (vector,) = need("ia3_l")
        return PeftIa3Patch(vector, feedforward(config, path))
    blocks, scale = need("boft_R", "boft_s")
    return PeftBoftPatch(blocks, scale)


def _lokr(refs: Mapping[str, Ref], scale: Scale) -> LokrPatch:
    w1, w2 = refs.get("lokr_w1"), refs.get("lokr_w2")
    if w1 is None and not {"lokr_w1_a", "lokr_w1_b"} <= set(refs):
        raise ValueError("PEFT LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
    if w2 is None and not {"lokr_w2_a", "lokr_w2_b"} <= set(refs):
        raise ValueError("PEFT LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
    if w2 is not None and len(w2.shape) == 3:
        raise ValueError("a full 3-D lokr_w2 (a Conv1d layer) is not supported: PEFT's merge (torch.kron of a 2-D "
                         "and a 3-D factor) lays the kernel out unlike LyCORIS' LoKr")
    if w1 is not None and w2 is not None and scale.value() != 1.0:
        # both factors full: PEFT still scales by alpha / r, LyCORIS readers by 1; fold it into w1
        factor, loader = scale.value(), w1.loader
        w1, scale = Ref(w1.shape, lambda: loader() * factor, w1.name), ONE
    return LokrPatch(w1=w1, w1a=refs.get("lokr_w1_a"), w1b=refs.get("lokr_w1_b"), w2=w2,
                     w2a=refs.get("lokr_w2_a"), w2b=refs.get("lokr_w2_b"), t2=refs.get("lokr_t2"), scale=scale)


class PeftLycorisDialect(Dialect):
    id = "peft-lycoris"
    description = ("PEFT LoHa/LoKr/OFT/BOFT/IA3 adapters (save_pretrained base_model.model. + adapter_config.json, or "
                   "diffusers unet./text_encoder. files with lora_adapter_metadata)")

    def detect(self, header: Header) -> Match | None:
        keys = list(header.keys())
        tuners = [hit[2] for hit in map(split_tuner_key, keys) if hit]
        if not tuners:
            return None
        kinds = sorted({NAMES[PARAMS[p]] for p in tuners})
        return Match(self.id, len(tuners) / len(keys), (f"PEFT {'/'.join(kinds)} tensors",))

    def read(self, file: LoraFile, index: ModuleIndex) -> PatchSet:
        result = PatchSet(source=file.header.display_name, dialect=self.id, metadata=file.metadata)
        config = load_adapter_config(file.path)
        per_component = metadata_configs(file.header)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for key in file.keys():
            hit = split_tuner_key(key)
            if hit is None:
                result.unmatched[key] = "not a PEFT LoHa/LoKr/OFT/BOFT/IA3 tensor name"
            else:
                groups.setdefault(hit[:2], {})[hit[2]] = key
        resolve = self._resolver(index, config)
        unconfigured = set()
        for (component, path), params in groups.items():
            tuners = {PARAMS[p] for p in params}
            module = f"{component}.{path}" if component else path
            target = resolve(component, path)
            reason = None if target else f"module {module!r} matches no module of the model"
            patch = None
            if reason is None and len(tuners) > 1:
                reason = f"module {module!r} mixes the tensors of {', '.join(sorted(NAMES[t] for t in tuners))}"
            if reason is None:
                own = config if not component else per_component.get(component)
                if own is None and tuners != {"BOFT"}:
                    unconfigured.add(component or "the file")
                refs = {p: Ref(file.header.shapes[k], partial(file.tensor, k), k) for p, k in params.items()}
                try:
                    patch = build(tuners.pop(), refs, own, path)
                except ValueError as exc:
                    reason = f"module {module!r}: {exc}"
            if patch is None:
                for key in params.values():
                    result.unmatched[key] = reason
            elif target in result.patches:
                for key in params.values():
                    result.unmatched[key] = f"{target} is already patched by another module of this file"
            else:
                result.patches[target] = patch
        if unconfigured:
            where = "adapter_config.json beside the file" if "the file" in unconfigured else \
                f"lora_adapter_metadata for {', '.join(sorted(unconfigured))}"
            result.warnings.append(f"no {where}: PEFT's defaults assumed (LoHa/LoKr scale 1, OFT with a "
                                   "5-term Cayley-Neumann series, IA3's side from the shapes)")
        return result

    @staticmethod
    def _resolver(index: ModuleIndex, config: Mapping[str, Any] | None) -> Callable[[str, str], str | None]:
        """``(component, path)`` → canonical target; a ``base_model.model.`` path is tried on the component its
        config's ``auto_mapping.base_model_class`` names first, then on every component of the index."""
        base_class = ((config or {}).get("auto_mapping") or {}).get("base_model_class")
        preferred = BASE_CLASS_COMPONENT.get(base_class)
        order = list(dict.fromkeys([c for c in [preferred, *index.components] if c and index.has_component(c)]))

        def resolve(component: str, path: str) -> str | None:
            for candidate in [component] if component else order:
                found = index.resolve(f"{candidate}.{path}")
                if found:
                    return f"{found[0]}.{found[1]}"
            return None

        return resolve
