"""The compatibility matrix, generated: every corpus layout (``../shared/corpus``, real and derived key lists at
full size, header only) and a set of generated files per dialect and kind, run through detection, reading,
full-size mapping and each host adapter's route. Writes ``compat_matrix/MATRIX.md`` and ``matrix.json``;
``--check`` fails when the committed files differ from a fresh run.

Everything here is deterministic (no timings); numerical agreement is checked by the test suite, whose test
for each row is named in the ``checked_by`` column.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
import torch

from .errors import LoraCompatError, NotALoraError
from .files import Header, LoraFile

HOSTS = ("diffusers", "a1111", "sdnext", "forge", "comfyui")
#: which test checks each dialect's numbers against a reference library
CHECKED_BY = {
    "kohya": "test_parity.py, test_flux_parity.py (diffusers 0.42 loaders)",
    "lycoris": "test_parity.py (lycoris-lora 4.1.3 forward pass)",
    "diffusers": "test_parity.py, test_flux_parity.py (peft 0.21 merge, diffusers 0.42)",
    "peft": "test_parity.py (peft 0.21 merge)",
    "xlabs": "test_flux_parity.py (diffusers 0.42)",
    "bfl": "test_flux_parity.py (lycoris-lora deltas, diffusers kohya loader)",
    "onetrainer": "test_flux.py (independent computation)",
    "bfl-control": "test_flux_parity.py (diffusers 0.42 FluxControlPipeline loader)",
}


@dataclass
class Row:
    layout: str
    provenance: str
    dialect: str
    base: str | None
    kinds: list[str] = field(default_factory=list)
    targets: int = 0
    unmatched: int = 0
    mapping: str = ""
    hosts: dict[str, str] = field(default_factory=dict)
    checked_by: str = ""
    #: measured agreement with the reference library ("< 1e-5 vs ..."), for generated files
    error: str = "-"


def default_corpus() -> Path:
    return Path(os.environ.get("LORA_COMPAT_CORPUS", Path(__file__).resolve().parents[2] / "shared" / "corpus"))


def _header_file(data: dict) -> LoraFile:
    shapes = {k: tuple(v) for k, v in data["keys"].items()}

    def no_reads(key: str) -> torch.Tensor:
        raise LoraCompatError(f"{key}: the matrix reads headers only")

    return LoraFile(Header(shapes, {k: "F16" for k in shapes}, data.get("metadata") or {}, None), no_reads, "memory")


def _routes(base: str | None, patchset) -> dict[str, str]:
    """What each host adapter does with this PatchSet (the adapters' own routing rules)."""
    from .adapters.diffusers import choose_route
    from .hostkeys import host_native

    if base is None:
        return {h: "partial: base undetermined from the header; names resolved, shapes unchecked" for h in HOSTS}
    kinds = patchset.kinds
    route = choose_route(patchset)
    hosts = {"diffusers": "works: " + {"diffusers": "diffusers route (PEFT LoRA)", "peft": "PEFT LoHa route",
                                       "patcher": "patcher route (exact merge)"}[route]}
    hosts["a1111"] = "refused: AUTOMATIC1111 has no Flux" if base == "flux1" else "works: lora_compat module type"
    hosts["sdnext"] = "works: lora_compat module type (diffusers names)"
    if "widen" in kinds:
        hosts["forge"] = "works: Forge reads Control LoRAs itself"
        hosts["comfyui"] = "works: handed to ComfyUI's own Control LoRA loader"
        return hosts
    native = all(host_native(p) for p in patchset.values())
    hosts["forge"] = "works: " + ("native patches" if native else "lora_compat patches (exact)")
    hosts["comfyui"] = "works: " + ("native patches" if native else "exact diffs at the chosen strength")
    return hosts


def corpus_rows(corpus: Path) -> list[Row]:
    from .core import detect

    index = json.loads((corpus / "INDEX.json").read_text())
    rows = []
    for entry in sorted(index, key=lambda e: e["file"]):
        name = entry["file"]
        data = json.loads((corpus / name).read_text())
        if "keys" not in data or not isinstance(data["keys"], dict):
            continue
        provenance = entry.get("provenance", data.get("provenance", ""))
        try:
            detection = detect(_header_file(data))
        except NotALoraError as exc:
            rows.append(Row(name, provenance, exc.kind, entry.get("base"), mapping=f"refused: {exc.kind}",
                            hosts={h: f"refused: not a LoRA ({exc.kind})" for h in HOSTS},
                            checked_by="test_bad_input.py, test_corpus.py"))
            continue
        except LoraCompatError as exc:
            rows.append(Row(name, provenance, "unknown", None, mapping=f"refused: {str(exc).split(': ', 1)[-1]}",
                            hosts={h: "refused" for h in HOSTS}))
            continue
        patchset = detection.patchset
        base = detection.base
        generating = _generating_model(data)
        if generating is not None:  # written on a tiny config: map it onto that model, shapes checked
            from .apply import resolve_patchset
            from .archs import ModuleIndex

            fitted = resolve_patchset(detection.file, ModuleIndex.from_modules(generating))
            base = entry.get("base")
            mapping = (f"works: {len(fitted)} targets on its generating (tiny) {base} model"
                       if not fitted.unmatched and not fitted.misfits
                       else f"partial: {len(fitted.unmatched)} keys unmatched on its generating model")
        elif detection.base and not patchset.unmatched:
            mapping = f"works: {len(patchset)} targets at full size"
        elif detection.base:
            mapping = f"partial: {len(patchset.unmatched)} keys unmatched"
        else:
            mapping = "partial: " + detection.base_reason
        rows.append(Row(name, provenance, detection.dialect.id, base, patchset.kinds, len(patchset),
                        len(patchset.unmatched), mapping, _routes(base, patchset),
                        CHECKED_BY.get(detection.dialect.id, "")))
    return rows


def _generating_model(data: dict) -> dict[str, torch.nn.Module] | None:
    """The tiny model a ``generated-real-library`` layout was written on, built on the meta device from its
    ``base_config`` (``None`` without diffusers/transformers or a config)."""
    configs = data.get("base_config")
    if not isinstance(configs, dict):
        return None
    try:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError:
        return None
    built = {}
    with torch.device("meta"):
        for component, config in configs.items():
            if not isinstance(config, dict):
                continue
            clean = {k: v for k, v in config.items()
                     if not k.startswith("_") and k not in ("transformers_version", "architectures", "dtype")}
            if component == "unet":
                built[component] = UNet2DConditionModel.from_config(clean)
            elif component.startswith("text_encoder"):
                cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
                built[component] = cls(CLIPTextConfig(**clean))
    return built or None


#: the tests' oracles (real lycoris-lora / peft files on tiny models): found when run from a source checkout
TESTS = Path(__file__).resolve().parents[1] / "tests"
TOLERANCE = 1e-5


def generated_rows() -> list[Row]:
    """Files written by the reference libraries on tiny SD1.5 models (the tests' oracles), applied with
    ``patched_weights`` and compared with what the library itself computes. Errors are reported against the
    project's tolerance (fp32 relative error < 1e-5), so the matrix does not depend on the machine's BLAS.
    Empty when the oracles are not importable (an installed package without the tests)."""
    import sys
    import tempfile
    import warnings

    if not (TESTS / "oracle_lycoris.py").is_file():
        return []
    sys.path.insert(0, str(TESTS))
    try:
        from oracle_lycoris import ALGOS, write_lycoris_file
        from oracle_models import make_sd15_components
        from oracle_peft import VARIANTS, write_peft_file
    except ImportError:
        return []
    finally:
        sys.path.remove(str(TESTS))
    from .apply import LoraCompatWarning, patched_weights
    from .core import read
    from .inspection import inspect

    components = make_sd15_components(seed=100)
    rows = []
    sources = [("lycoris-lora 4.1.3", v, write_lycoris_file, "lycoris forward") for v in ALGOS] + \
        [("peft 0.21", v, write_peft_file, "peft merge") for v in VARIANTS]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraCompatWarning)
        for library, variant, writer, oracle in sources:
            folder = Path(tmp) / f"{library.split()[0]}-{variant}"
            folder.mkdir()
            path, expected = writer(folder, components, variant)
            info = inspect(path)
            patchset = read(path)
            got = patched_weights(path, components)
            worst = max(float((got[k] - v).norm() / v.norm()) for k, v in expected.items())
            same_keys = got.keys() == expected.keys()
            error = (f"< 1e-5 vs {oracle}" if worst < TOLERANCE and same_keys
                     else f"FAIL: {worst:.1e} vs {oracle}" + ("" if same_keys else " (different parameters)"))
            rows.append(Row(f"generated: {library} {variant}", "generated-real-library", info.dialect, "sd15",
                            info.kinds, info.targets, len(info.unmatched),
                            f"works: {info.targets} targets on the tiny sd15 model it was written on",
                            _routes("sd15", patchset), "test_parity.py", error))
    return rows


def build(corpus: Path) -> dict:
    return json.loads(_build(str(Path(corpus).resolve())))


@functools.lru_cache(maxsize=4)
def _build(corpus: str) -> str:
    """The matrix as JSON text, built once per process and corpus (generating the files takes a while)."""
    rows = corpus_rows(Path(corpus)) + generated_rows()
    return json.dumps({"hosts": list(HOSTS), "rows": [asdict(r) for r in rows]})


def markdown(matrix: dict) -> str:
    lines = ["# Compatibility matrix", "",
             "Generated by `lora-compat matrix` (do not edit): every layout of the shared corpus read from its",
             "header at full size, then every file the tests generate with the reference libraries (lycoris-lora,",
             "peft) applied and compared with the library's own result, and what each host does with each.",
             "`works` / `partial` (with the reason) / `refused` (with the reason).", "",
             "| layout | dialect | base | kinds | targets | mapping | " + " | ".join(matrix["hosts"])
             + " | numerical error | checked by |",
             "|" + "---|" * (8 + len(matrix["hosts"]))]
    for row in matrix["rows"]:
        cells = [row["layout"].removesuffix(".json"), row["dialect"], row["base"] or "-",
                 ", ".join(row["kinds"]) or "-", str(row["targets"]), row["mapping"]]
        cells += [row["hosts"].get(h, "-") for h in matrix["hosts"]]
        cells += [row.get("error", "-"), row["checked_by"] or "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, corpus: Path) -> tuple[str, str]:
    matrix = build(corpus)
    text_json = json.dumps(matrix, indent=1, sort_keys=True) + "\n"
    text_md = markdown(matrix)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(text_json)
    (out / "MATRIX.md").write_text(text_md)
    return text_json, text_md


def check(out: Path, corpus: Path) -> list[str]:
    """Names of the committed files that differ from a fresh run (empty: up to date)."""
    matrix = build(corpus)
    fresh = {"matrix.json": json.dumps(matrix, indent=1, sort_keys=True) + "\n", "MATRIX.md": markdown(matrix)}
    return [name for name, text in fresh.items()
            if not (out / name).is_file() or (out / name).read_text() != text]

