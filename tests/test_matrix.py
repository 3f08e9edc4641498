"""`lora-compat matrix` runs from an installed (non-editable) copy of the package, with nothing of tests/ in reach,
prints nothing but its own lines, and its fresh run equals the committed compat_matrix/ (CI also runs
`lora-compat matrix --check`)."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lora_compat
from lora_compat import corpus, matrix
from lora_compat.cli import main

from installed import clean_env, installed_site

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "compat_matrix"

#: run in the installed copy: the tests' modules must not be importable, lora_compat must come from the copy
RUN_MATRIX = """
import importlib.util, sys
site, out = sys.argv[1], sys.argv[2]
for name in ("tests", "corpus", "installed", "oracle_lycoris", "oracle_models", "oracle_peft", "lora_pool"):
    assert importlib.util.find_spec(name) is None, name
import lora_compat
assert lora_compat.__file__.startswith(site), lora_compat.__file__
from lora_compat.cli import main
sys.exit(main(["matrix", "--out", out]))
"""


@pytest.fixture(scope="module")
def installed_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`lora-compat matrix` run from a non-editable install of the package, in a folder without tests/; returns
    the process and the output folder."""
    site = installed_site()
    work = tmp_path_factory.mktemp("matrix")
    out = work / "compat_matrix"
    done = subprocess.run([sys.executable, "-P", "-c", RUN_MATRIX, str(site), str(out)], cwd=work,
                          env=clean_env(PYTHONPATH=str(site)), capture_output=True, text=True, timeout=1200)
    return done, out


def test_matrix_from_an_installed_package_equals_the_committed_one(installed_run) -> None:
    done, out = installed_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "matrix.json").read_text() == (COMMITTED / "matrix.json").read_text(), \
        "run `lora-compat matrix` and commit the result"
    assert (out / "MATRIX.md").read_text() == (COMMITTED / "MATRIX.md").read_text()


def test_matrix_prints_progress_on_stderr_and_no_library_output(installed_run) -> None:
    """No diffusers/transformers/peft/lycoris log line, warning or progress bar: stdout is the one result line,
    stderr one progress line per layout and per generated file."""
    done, out = installed_run
    assert done.stdout == f"wrote {out / 'MATRIX.md'} and {out / 'matrix.json'}\n"
    lines = done.stderr.splitlines()
    names = sorted(entry["file"] for entry in corpus.index())
    assert lines[:len(names)] == [f"lora-compat matrix: corpus {i}/{len(names)}: {name}"
                                  for i, name in enumerate(names, 1)]
    generated = [row["layout"].removeprefix("generated: ")
                 for row in json.loads((out / "matrix.json").read_text())["rows"]
                 if row["layout"].startswith("generated: ")]
    assert lines[len(names):] == [f"lora-compat matrix: generated {i}/{len(generated)}: {name}"
                                  for i, name in enumerate(generated, 1)]


def test_rows_of_the_layouts_of_unsupported_families(installed_run) -> None:
    """Model files are refused as checkpoints; LoRAs of unknown families get no base and every key unmatched; the
    Qwen-Image LoKr fixture maps by name."""
    rows = {row["layout"]: row for row in json.loads((installed_run[1] / "matrix.json").read_text())["rows"]}
    for name in ("invokeai_z_image_transformer_comfyui_keys.json", "invokeai_anima_comfyui_keys.json"):
        row = rows[name]
        assert (row["dialect"], row["mapping"], row["targets"]) == ("checkpoint", "refused: checkpoint", 0)
        assert set(row["hosts"].values()) == {"refused: not a LoRA (checkpoint)"}
    for name, dialect in (("invokeai_anima_lora_kohya_format.json", "kohya"),):
        row, keys = rows[name], len(corpus.load(name)["keys"])
        assert (row["dialect"], row["base"], row["kinds"], row["targets"], row["unmatched"], row["checked_by"]) == \
            (dialect, None, [], 0, keys, "test_corpus.py")
        assert row["mapping"] == f"refused: unknown base: none of its {keys} keys maps to a module of a supported base"
        assert set(row["hosts"].values()) == {
            "refused: no key maps to a module of a supported base (every key reported unmatched)"}
    # Qwen-Image is supported (issue 14): its LoKr fixture's synthetic factor shapes fit no full-size model, so its
    # 8 modules map by name on qwen-image, the only candidate, and no base is named
    row = rows["invokeai_qwen_image_lora_kohya_format.json"]
    assert (row["dialect"], row["base"], row["kinds"], row["targets"], row["unmatched"]) == \
        ("lycoris", None, ["lokr"], 8, 0)
    assert row["mapping"] == "partial: names match but shapes fit no full-size base and metadata names none"
    assert set(row["hosts"].values()) == {
        "partial: base undetermined from the header; names resolved, shapes unchecked"}


def test_every_corpus_layout_has_a_row() -> None:
    rows = json.loads((COMMITTED / "matrix.json").read_text())["rows"]
    listed = {entry["file"] for entry in corpus.index()}
    assert {row["layout"] for row in rows if not row["layout"].startswith("generated: ")} == listed
    assert all(row["mapping"].startswith(("works", "partial", "refused")) for row in rows)
    generated = [row for row in rows if row["layout"].startswith("generated: ")]
    assert len(generated) >= 28 and all(row["error"].startswith("< 1e-5 vs ") for row in generated)


def test_matrix_check_fails_on_a_stale_file(installed_run, tmp_path: Path, monkeypatch, capsys) -> None:
    """`--check` against the installed run's result (a fresh build, done once): equal passes, stale fails."""
    fresh = json.loads((installed_run[1] / "matrix.json").read_text())
    monkeypatch.setattr(matrix, "build", lambda corpus, progress=None: fresh)
    assert main(["matrix", "--out", str(tmp_path)]) == 0
    assert main(["matrix", "--check", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{tmp_path}: up to date"
    (tmp_path / "MATRIX.md").write_text((tmp_path / "MATRIX.md").read_text().replace("works", "broken", 1))
    assert main(["matrix", "--check", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"lora-compat matrix: MATRIX.md in {tmp_path} differ from a fresh run; run "
                                       "`lora-compat matrix` and commit the result\n")


def test_matrix_reads_a_corpus_folder_of_plain_json(tmp_path: Path) -> None:
    """`--corpus DIR`: plain ``*.json`` layouts give the rows the shipped (gzipped) copies give."""
    names = ["derived_sd15_kohya_lora_full.json", "invokeai_anima_comfyui_keys.json"]
    entries = [e for e in corpus.index() if e["file"] in names]
    (tmp_path / "INDEX.json").write_text(json.dumps(entries))
    for name in names:
        (tmp_path / name).write_text(json.dumps(corpus.load(name)))
    assert not list(tmp_path.glob("*.gz"))
    rows = matrix.corpus_rows(tmp_path)
    assert [r.layout for r in rows] == names
    assert (rows[0].dialect, rows[0].base, rows[0].targets, rows[0].unmatched) == ("kohya", "sd15", 264, 0)
    assert (rows[1].dialect, rows[1].mapping) == ("checkpoint", "refused: checkpoint")


def test_matrix_without_the_reference_libraries_says_which_are_missing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "lycoris", None)  # find_spec → None, import → ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "toml", None)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "INDEX.json").write_text("[]")
    assert main(["matrix", "--out", str(tmp_path / "out"), "--corpus", str(tmp_path / "corpus")]) == 2
    assert capsys.readouterr().err == ("lora-compat matrix: the reference-library oracles need lycoris-lora, toml "
                                       '(not installed); install them with: pip install "lora-compat[test]"\n')
    assert not (tmp_path / "out").exists()


def test_an_oracle_module_without_its_library_raises_a_clear_error(monkeypatch) -> None:
    from lora_compat.errors import LoraCompatError

    monkeypatch.setitem(sys.modules, "lycoris", None)
    monkeypatch.delitem(sys.modules, "lora_compat.oracles.lycoris_oracle", raising=False)
    with pytest.raises(LoraCompatError, match=r"^the reference-library oracles need lycoris-lora \(not installed\)"):
        import lora_compat.oracles.lycoris_oracle  # noqa: F401


def test_matrix_names_a_peft_older_than_transformers_accepts(tmp_path: Path, monkeypatch, capsys) -> None:
    """transformers raises a bare ValueError deep inside the run for a peft below its minimum: said up front."""
    from transformers.integrations.peft import MIN_PEFT_VERSION

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.0" if name == "peft" else real(name))
    (tmp_path / "INDEX.json").write_text("[]")
    assert main(["matrix", "--out", str(tmp_path / "out"), "--corpus", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"lora-compat matrix: transformers {real('transformers')} needs peft >= {MIN_PEFT_VERSION}, but peft 0.1.0 "
        f"is installed: install peft >= {MIN_PEFT_VERSION} or a transformers that accepts peft 0.1.0\n")


def test_the_matrix_imports_no_host_adapter() -> None:
    """The host columns come from the adapters' own routing (lora_compat.adapters.routes), handed in by the CLI:
    importing and running the matrix's corpus rows loads no adapter module."""
    code = ("import sys; from lora_compat import corpus, matrix; rows = matrix.corpus_rows(corpus.BUNDLED); "
            "assert len(rows) == len(corpus.index()); "
            "print(sorted(m for m in sys.modules if m.startswith('lora_compat.adapters')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    assert done.stdout.strip() == "[]"


def test_matrix_build_without_host_routes_says_how_to_measure_them(monkeypatch) -> None:
    from lora_compat.errors import LoraCompatError

    monkeypatch.setattr(matrix, "_HOST_ROUTES", [])
    with pytest.raises(LoraCompatError, match=r"use_host_routes\(lora_compat\.adapters\.routes\.host_routes\)"):
        matrix.build(Path("no-such-corpus-folder"))


def test_host_routes_of_a_flux_control_lora_follow_the_adapters(tmp_path: Path) -> None:
    """The Forge and ComfyUI adapters hand a FLUX.1 Control LoRA to the host whole (their ``*_reads_itself``),
    A1111 has no Flux, diffusers and SD.Next get it through lora_compat."""
    from flux_models import control_file, make_flux
    from lora_compat.adapters.routes import HOST_FACTS, host_routes

    path = control_file(tmp_path / "control.safetensors", make_flux())
    hosts = host_routes(matrix.RouteQuery(path, "flux1", lora_compat.read(path)))
    assert hosts == {"diffusers": "works: patcher route (exact merge)",
                     "a1111": HOST_FACTS[("a1111", "flux1")].cell,
                     "sdnext": "works: lora_compat module type (diffusers names)",
                     "forge": HOST_FACTS[("forge", "bfl-control")].cell,
                     "comfyui": HOST_FACTS[("comfyui", "bfl-control")].cell}
