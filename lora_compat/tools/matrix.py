"""The compatibility matrix, generated: every corpus layout (``lora_compat/corpus``: real, derived and generated
key lists, header only) and a set of files written by the reference libraries per dialect and kind, run through
detection, reading, full-size mapping and each host adapter's route. Writes ``compat_matrix/MATRIX.md`` and
``matrix.json``; ``--check`` fails when the committed files differ from a fresh run.

The host columns are measured by the host adapters themselves (``lora_compat.adapters.routes.host_routes``, run
on every file); this module imports no adapter: whoever builds the matrix hands the routes in with
:func:`use_host_routes` (``lora-compat matrix`` does).

Generating the files needs the ``[test]`` extra's libraries (lycoris-lora, peft, diffusers, transformers): without
them :func:`build` raises :class:`LoraCompatError` naming what is missing. Their own log lines, warnings and
progress bars are kept out of the output; :func:`build` reports its progress through a callback.

Everything here is deterministic (no timings); numerical agreement is checked by the test suite, whose test
for each row is named in the ``checked_by`` column.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import corpus as corpus_data
from ..errors import LoraCompatError, NotALoraError

Progress = Callable[[str], None]

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
    "native": "test_wan.py, test_nextdit.py (diffusers 0.42 loaders, independent computation)",
}
#: the newer families: their own tests check every layout's numbers on a tiny config of the diffusers class,
#: whichever dialect reads the file
CHECKED_BY_BASE = {
    "wan": "test_wan.py (diffusers 0.42 loader)",
    "qwen-image": "test_qwen_image.py (diffusers 0.42 loader, peft merge, lycoris-lora forward pass)",
    "flux2": "test_flux2.py (diffusers 0.42 loader, independent computation)",
    "chroma": "test_chroma.py (diffusers 0.42 loader, independent computation)",
    "sd3": "test_sd3.py (diffusers 0.42 loader, independent computation)",
    "z-image": "test_nextdit.py (diffusers 0.42 loader)",
    "lumina2": "test_nextdit.py (diffusers 0.42 loader)",
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
    """The corpus shipped in the package."""
    return corpus_data.BUNDLED


@dataclass(frozen=True)
class RouteQuery:
    """One file for a :data:`HostRoutes` function: a path or ``LoraFile`` whose tensors can be read
    (placeholders do for header-only layouts: routes depend on names, shapes and kinds, never on values), its
    base and its canonical patches."""

    file: Any
    base: str
    patchset: Any


#: what each host does with one file whose base is known (``lora_compat.adapters.routes.host_routes``): the
#: matrix imports no host adapter, whoever builds it says how the host columns are measured
HostRoutes = Callable[[RouteQuery], dict[str, str]]
_HOST_ROUTES: list[HostRoutes] = []


def use_host_routes(routes: HostRoutes) -> None:
    """Measure the host columns with ``routes`` (the CLI passes the host adapters' own,
    ``lora_compat.adapters.routes.host_routes``)."""
    if _HOST_ROUTES != [routes]:
        _HOST_ROUTES[:] = [routes]
        _BUILT.clear()


def _routes(base: str | None, patchset, file: Any, routes: HostRoutes | None) -> dict[str, str]:
    """What each host does with this file: the cases no host decides, else ``routes`` (``{}`` without one)."""
    if base is None and not patchset:
        return {h: "refused: no key maps to a module of a supported base (every key reported unmatched)"
                for h in HOSTS}
    if base is None:
        return {h: "partial: base undetermined from the header; names resolved, shapes unchecked" for h in HOSTS}
    if routes is None:
        return {}
    return routes(RouteQuery(file, base, patchset))


def _placeholders(data: dict) -> Callable[[str], Any]:
    """Tensor reads for a header-only layout: zeros for scalars (alphas are read as numbers), uninitialised
    tensors of the right shape otherwise (host routes depend on names, shapes and kinds, never on values)."""
    import math

    import torch

    shapes = {k: tuple(v) for k, v in data["keys"].items()}
    return lambda key: torch.zeros(shapes[key]) if math.prod(shapes[key]) <= 1 else torch.empty(shapes[key])


def corpus_rows(corpus: Path, progress: Progress | None = None, routes: HostRoutes | None = None) -> list[Row]:
    """A row per corpus layout, read from its header; ``routes`` measures the host columns (none: left empty)."""
    from ..detection import detect

    entries = sorted(corpus_data.index(corpus), key=lambda e: e["file"])
    rows = []
    for number, entry in enumerate(entries, 1):
        name = entry["file"]
        if progress:
            progress(f"corpus {number}/{len(entries)}: {name}")
        data = corpus_data.load(name, corpus)
        if "keys" not in data or not isinstance(data["keys"], dict):
            continue
        provenance = entry.get("provenance", data.get("provenance", ""))
        try:
            detection = detect(corpus_data.header_file(data))
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
        generating = corpus_data.generating_model(data)
        if generating is not None:  # written on a tiny config: map it onto that model, shapes checked
            from ..models import resolve_patchset
            from ..archs import ModuleIndex

            fitted = resolve_patchset(detection.file, ModuleIndex.from_modules(generating))
            base = entry.get("base")
            mapping = (f"works: {len(fitted)} targets on its generating (tiny) {base} model"
                       if not fitted.unmatched and not fitted.misfits
                       else f"partial: {len(fitted.unmatched)} keys unmatched on its generating model")
        elif detection.base and not patchset.unmatched:
            mapping = f"works: {len(patchset)} targets at full size"
        elif detection.base:
            mapping = f"partial: {len(patchset.unmatched)} keys unmatched"
        elif not patchset:
            mapping = (f"refused: unknown base: none of its {len(patchset.unmatched)} keys maps to a module of "
                       "a supported base")
        else:
            mapping = "partial: " + detection.base_reason
        checked_by = (CHECKED_BY_BASE.get(base or "") or CHECKED_BY.get(detection.dialect.id, "") if patchset
                      else "test_corpus.py")
        rows.append(Row(name, provenance, detection.dialect.id, base, patchset.kinds, len(patchset),
                        len(patchset.unmatched), mapping,
                        _routes(base, patchset, corpus_data.header_file(data, read=_placeholders(data)), routes),
                        checked_by))
    return rows


TOLERANCE = 1e-5


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the reference libraries' log lines (their own handlers included, e.g. lycoris' on stdout),
    warnings and progress bars (tqdm) out of the output: logging is off, warnings are ignored, and what they
    print goes nowhere."""
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def generated_rows(progress: Progress | None = None, routes: HostRoutes | None = None) -> list[Row]:
    """Files written by the reference libraries on tiny SD1.5 models (:mod:`lora_compat.oracles`), applied with
    ``patched_weights`` and compared with what the library itself computes. Errors are reported against the
    project's tolerance (fp32 relative error < 1e-5), so the matrix does not depend on the machine's BLAS."""
    import tempfile

    from ..oracles import require

    require()
    from ..models import patched_weights
    from ..detection import read
    from .inspection import inspect

    with quiet_libraries():
        from ..oracles.lycoris_oracle import ALGOS, write_lycoris_file
        from ..oracles.models import make_sd15_components
        from ..oracles.peft_oracle import VARIANTS, write_peft_file

        components = make_sd15_components(seed=100)
    rows = []
    sources = [("lycoris-lora 4.1.3", v, write_lycoris_file, "lycoris forward") for v in ALGOS] + \
        [("peft 0.21", v, write_peft_file, "peft merge") for v in VARIANTS]
    with tempfile.TemporaryDirectory() as tmp:
        for number, (library, variant, writer, oracle) in enumerate(sources, 1):
            if progress:
                progress(f"generated {number}/{len(sources)}: {library} {variant}")
            folder = Path(tmp) / f"{library.split()[0]}-{variant}"
            folder.mkdir()
            with quiet_libraries():
                try:
                    path, expected = writer(folder, components, variant)
                except (ImportError, ValueError, RuntimeError) as exc:
                    raise LoraCompatError(f"{library.split()[0]} could not write its {variant} file: "
                                          f"{type(exc).__name__}: {exc}") from exc
                info = inspect(path)
                patchset = read(path)
                got = patched_weights(path, components)
                hosts = _routes("sd15", patchset, path, routes)
            worst = max(float((got[k] - v).norm() / v.norm()) for k, v in expected.items())
            same_keys = got.keys() == expected.keys()
            error = (f"< 1e-5 vs {oracle}" if worst < TOLERANCE and same_keys
                     else f"FAIL: {worst:.1e} vs {oracle}" + ("" if same_keys else " (different parameters)"))
            rows.append(Row(f"generated: {library} {variant}", "generated-real-library", info.dialect, "sd15",
                            info.kinds, info.targets, len(info.unmatched),
                            f"works: {info.targets} targets on the tiny sd15 model it was written on",
                            hosts, "test_parity.py", error))
    return rows


_BUILT: dict[str, str] = {}


def build(corpus: Path, progress: Progress | None = None) -> dict:
    """The matrix of the corpus folder, built once per process and corpus (generating the files takes a while).
    ``progress`` receives one line per layout and generated file."""
    key = str(Path(corpus).resolve())
    if key not in _BUILT:
        if not _HOST_ROUTES:
            raise LoraCompatError("the matrix's host columns are measured by the host adapters: call "
                                  "lora_compat.tools.matrix.use_host_routes(lora_compat.adapters.routes.host_routes) "
                                  "first (`lora-compat matrix` does)")
        routes = _HOST_ROUTES[0]
        from ..oracles import require

        require()  # before the corpus rows: a missing library should not cost the minute they take
        with quiet_libraries():
            rows = corpus_rows(Path(key), progress=progress, routes=routes)
        rows += generated_rows(progress=progress, routes=routes)
        _BUILT[key] = json.dumps({"hosts": list(HOSTS), "rows": [asdict(r) for r in rows]})
    return json.loads(_BUILT[key])


def markdown(matrix: dict) -> str:
    lines = ["# Compatibility matrix", "",
             "Generated by `lora-compat matrix` (do not edit): every layout of the corpus (lora_compat/corpus) read from its",
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


def write(out: Path, corpus: Path, progress: Progress | None = None) -> tuple[str, str]:
    matrix = build(corpus, progress)
    text_json = json.dumps(matrix, indent=1, sort_keys=True) + "\n"
    text_md = markdown(matrix)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(text_json)
    (out / "MATRIX.md").write_text(text_md)
    return text_json, text_md


def check(out: Path, corpus: Path, progress: Progress | None = None) -> list[str]:
    """Names of the committed files that differ from a fresh run (empty: up to date)."""
    matrix = build(corpus, progress)
    fresh = {"matrix.json": json.dumps(matrix, indent=1, sort_keys=True) + "\n", "MATRIX.md": markdown(matrix)}
    return [name for name, text in fresh.items()
            if not (out / name).is_file() or (out / name).read_text() != text]

