"""The LoRA library: a generated library of a few hundred small files across dialects and bases, with sidecars;
full, incremental and resumed indexing; search quality on a labelled query set; triggers and strengths from
the right sources; the base filter."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_compat import plugins
from lora_compat.archs.flux import bfl_parts
from lora_compat.cli import main
from lora_compat.library import MIGRATIONS, Library

TOPICS = {
    "watercolor": ("watercolor painting", ["wc_style"], ["watercolor", "soft edges", "paper texture"]),
    "cyberpunk": ("cyberpunk neon city", ["cyb3rpunk"], ["neon lights", "cyberpunk", "night city"]),
    "pixelart": ("pixel art sprite", ["pixel_art"], ["pixel art", "8-bit", "sprite"]),
    "oilpaint": ("oil painting portrait", ["oilpnt"], ["oil painting", "impasto", "canvas"]),
    "steampunk": ("steampunk machinery", ["steamp"], ["steampunk", "brass gears", "victorian"]),
    "ghibli": ("anime landscape studio", ["ghbli"], ["anime landscape", "clouds", "green hills"]),
    "lineart": ("ink line art sketch", ["lineart_ink"], ["line art", "monochrome", "sketch"]),
    "lowpoly": ("low poly 3d render", ["lowp0ly"], ["low poly", "3d render", "polygons"]),
    "claymation": ("clay figure stop motion", ["clayfig"], ["claymation", "plasticine", "stop motion"]),
    "vaporwave": ("vaporwave retro aesthetic", ["vpwave"], ["vaporwave", "pink sunset", "retro grid"]),
    "knight": ("armored knight character", ["sir_knight"], ["knight", "plate armor", "sword"]),
    "cat": ("fluffy cat character", ["mochi_cat"], ["cat", "fluffy fur", "whiskers"]),
}
QUERIES = {
    "watercolor": "a watercolor painting of a harbor", "cyberpunk": "a street at night with neon lights, cyberpunk",
    "pixelart": "8-bit pixel art sprite of a hero", "oilpaint": "impasto oil painting portrait of a man",
    "steampunk": "steampunk airship with brass gears", "ghibli": "green hills and clouds anime landscape",
    "lineart": "monochrome line art sketch of a bird", "lowpoly": "low poly 3d render of a fox",
    "claymation": "claymation plasticine figure", "vaporwave": "vaporwave pink sunset retro grid",
    "knight": "a knight in plate armor holding a sword", "cat": "a fluffy cat with long whiskers",
}
BASES = ("sd15", "sdxl", "flux1")


def _modules(base: str, count: int = 4) -> dict[str, tuple[int, ...]]:
    """A few full-size target modules of the base (enough for its shapes to decide the base)."""
    index = plugins.archs()[base].index
    if base == "flux1":
        parts = bfl_parts(index.components["transformer"])
        return {f"double_blocks.{i}.img_attn.qkv": (parts[f"double_blocks.{i}.img_attn.qkv"][-1].stop, 3072)
                for i in range(count)}
    unet = index.components["unet"]
    names = [p for p in unet if p.endswith(("attn2.to_k", "attn1.to_q")) and "transformer_blocks" in p]
    return {p: unet[p]["weight"] for p in names[:count]}


def write_lora(path: Path, base: str, topic: str, variant: int) -> None:
    g = torch.Generator().manual_seed(variant)
    tensors, metadata = {}, {}
    for module, (out, inner) in _modules(base).items():
        down, up = torch.randn(1, inner, generator=g).half(), torch.randn(out, 1, generator=g).half()
        if base == "flux1":
            key = "lora_unet_" + module.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
        elif base == "sdxl":
            tensors.update({f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up})
        else:
            key = "lora_unet_" + module.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(1.0).half()})
    title, triggers, tags = TOPICS[topic]
    source = variant % 4
    if source == 0:
        metadata["ss_tag_frequency"] = json.dumps({f"10_{topic}": {t: 50 - i for i, t in enumerate(tags)}})
        metadata["ss_output_name"] = f"{topic}_v{variant}"
    elif source == 1:
        metadata["modelspec.trigger_phrase"] = ", ".join(triggers)
        metadata["modelspec.title"] = title
    save_file(tensors, str(path), metadata=metadata)
    if source == 2:
        path.with_suffix(".json").write_text(json.dumps({"activation text": ", ".join(triggers),
                                                         "preferred weight": 0.65, "description": title}))
    elif source == 3:
        path.with_suffix(".civitai.info").write_text(json.dumps({
            "trainedWords": triggers, "baseModel": {"sd15": "SD 1.5", "sdxl": "SDXL 1.0", "flux1": "Flux.1 D"}[base],
            "model": {"name": title}, "images": [{"meta": {"prompt": f"{tags[0]}, {tags[1]}, masterpiece"}}]}))


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    for base in BASES:
        for topic in TOPICS:
            for variant in range(8):
                folder = root / base / topic
                folder.mkdir(parents=True, exist_ok=True)
                write_lora(folder / f"{topic}_{base}_{variant}.safetensors", base, topic, variant)
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"emb_params": torch.zeros(2, 768)}, str(root / "embedding.safetensors"))
    return root


def test_index_search_and_resume(tmp_path: Path, library_dir: Path, capsys) -> None:
    files = 3 * len(TOPICS) * 8
    with Library(tmp_path / "lib.sqlite") as library:
        assert library.schema_version == len(MIGRATIONS)
        report = library.index([library_dir])
        assert (report.added, report.failed) == (files, 2)
        assert "broken.safetensors" in " ".join(report.errors) and "textual-inversion" in " ".join(report.errors.values())
        again = library.index([library_dir])
        assert (again.added, again.updated, again.unchanged) == (0, 0, files + 2)
        rows = library.rows()
        assert sorted({r["base"] for r in rows}) == sorted(BASES) and len(rows) == files

        hits1 = hits5 = 0
        for topic, query in QUERIES.items():
            for base in BASES:
                results = library.search(query, base=base, k=5)
                assert results and all(r.base == base for r in results)  # the base filter never fails
                names = [Path(r.path).parent.name for r in results]
                hits1 += names[0] == topic
                hits5 += topic in names
        total = len(QUERIES) * len(BASES)
        print(f"top-1 {hits1 / total:.2f}, top-5 {hits5 / total:.2f} over {total} labelled queries")
        assert hits5 == total and hits1 / total >= 0.9


def test_interrupted_index_resumes_without_duplicates(tmp_path: Path, library_dir: Path) -> None:
    seen = []

    def stop_after_40(path: Path) -> None:
        seen.append(path)
        if len(seen) == 40:
            raise KeyboardInterrupt

    db = tmp_path / "lib.sqlite"
    with Library(db) as library, pytest.raises(KeyboardInterrupt):
        library.index([library_dir], on_file=stop_after_40)
    with Library(db) as library:
        assert library.db.execute("SELECT COUNT(*) FROM loras").fetchone()[0] == 39
        report = library.index([library_dir])
        total = 3 * len(TOPICS) * 8 + 2
        assert report.added + report.failed == total - 39 and report.unchanged == 39
        count, distinct = library.db.execute("SELECT COUNT(*), COUNT(DISTINCT path) FROM loras").fetchone()
        assert count == distinct == total


def test_changed_and_removed_files_are_noticed(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    write_lora(root / "a.safetensors", "sd15", "cat", 0)
    write_lora(root / "b.safetensors", "sd15", "knight", 0)
    with Library(tmp_path / "lib.sqlite") as library:
        assert library.index([root]).added == 2
        write_lora(root / "a.safetensors", "sd15", "watercolor", 4)
        (root / "b.safetensors").unlink()
        report = library.index([root])
        assert (report.updated, report.removed) == (1, 1)
        assert library.search("watercolor painting")[0].path == str(root / "a.safetensors")


def test_triggers_strength_and_hash_come_from_the_right_sources(tmp_path: Path) -> None:
    root = tmp_path / "loras"
    root.mkdir()
    for variant in range(4):
        write_lora(root / f"cat{variant}.safetensors", "sd15", "cat", variant)
    with Library(tmp_path / "lib.sqlite") as library:
        library.index([root])
        rows = {Path(r["path"]).stem: r for r in library.rows()}
    triggers = {stem: json.loads(r["triggers"]) for stem, r in rows.items()}
    assert triggers["cat0"][:3] == ["cat", "fluffy fur", "whiskers"]  # ss_tag_frequency, most frequent first
    assert triggers["cat1"] == ["mochi_cat"]  # modelspec.trigger_phrase
    assert triggers["cat2"] == ["mochi_cat"] and rows["cat2"]["preferred_weight"] == 0.65  # A1111 sidecar
    assert triggers["cat3"] == ["mochi_cat"] and rows["cat3"]["title"] == "fluffy cat character"  # Civitai
    data = (root / "cat0.safetensors").read_bytes()
    assert rows["cat0"]["autov2"] == hashlib.sha256(data).hexdigest()[:10].upper()


def test_an_older_schema_is_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute(MIGRATIONS[0])
    db.execute(MIGRATIONS[1])
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO loras (path, size, mtime_ns, status) VALUES ('x', 1, 1, 'ok')")
    db.commit()
    db.close()
    with Library(tmp_path / "old.sqlite") as library:
        assert library.schema_version == len(MIGRATIONS)
        assert library.db.execute("SELECT path, autov2 FROM loras").fetchall()[0][:] == ("x", None)


def test_cli_index_search_recommend(tmp_path: Path, library_dir: Path, capsys) -> None:
    db = str(tmp_path / "lib.sqlite")
    assert main(["index", str(library_dir / "sdxl"), "--db", db, "--quiet", "--no-hash"]) == 0
    assert "96 added" in capsys.readouterr().out
    assert main(["search", "neon lights at night", "--base", "sdxl", "-k", "2", "--json", "--db", db]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2 and all("cyberpunk" in r["path"] for r in results)
    assert results[0]["why"] and results[0]["base"] == "sdxl"
    assert main(["recommend", "a knight in armor", "--base", "sdxl", "--json", "--db", db]) == 0
    stack = json.loads(capsys.readouterr().out)
    assert stack["prompt"].startswith("a knight in armor, ") and "sir_knight" in stack["prompt"]
    assert all("knight" in entry["path"] for entry in stack["stack"])
    assert main(["search", "a knight", "--base", "sd15", "--db", db]) == 0
    assert capsys.readouterr().out.strip() == "no match for base sd15"
