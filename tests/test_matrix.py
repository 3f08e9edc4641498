"""The committed compatibility matrix equals a fresh run (CI also runs `lora-compat matrix --check`)."""
from __future__ import annotations

from pathlib import Path

from lora_compat import matrix
from lora_compat.cli import main

from corpus import CORPUS

ROOT = Path(__file__).resolve().parents[1]


def test_committed_matrix_is_up_to_date() -> None:
    assert matrix.check(ROOT / "compat_matrix", CORPUS) == [], "run `lora-compat matrix` and commit the result"


def test_matrix_check_fails_on_a_stale_file(tmp_path: Path, capsys) -> None:
    assert main(["matrix", "--out", str(tmp_path), "--corpus", str(CORPUS)]) == 0
    assert main(["matrix", "--check", "--out", str(tmp_path), "--corpus", str(CORPUS)]) == 0
    (tmp_path / "MATRIX.md").write_text((tmp_path / "MATRIX.md").read_text().replace("works", "broken", 1))
    assert main(["matrix", "--check", "--out", str(tmp_path), "--corpus", str(CORPUS)]) == 1
    assert "MATRIX.md" in capsys.readouterr().err


def test_every_corpus_layout_has_a_row() -> None:
    import json

    rows = json.loads((ROOT / "compat_matrix" / "matrix.json").read_text())["rows"]
    listed = {entry["file"] for entry in json.loads((CORPUS / "INDEX.json").read_text())}
    assert {row["layout"] for row in rows if not row["layout"].startswith("generated: ")} == listed
    assert all(row["mapping"].startswith(("works", "partial", "refused")) for row in rows)
    generated = [row for row in rows if row["layout"].startswith("generated: ")]
    assert len(generated) >= 28 and all(row["error"].startswith("< 1e-5 vs ") for row in generated)
