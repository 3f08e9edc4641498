"""The lora-compat command line: tables, JSON, exit codes, --help everywhere."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_compat.cli import main
from lora_compat.tools.examples import EXAMPLES, write_examples


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return {p.name: p for p in write_examples(tmp_path_factory.mktemp("examples"))}


def test_inspect_table(examples, capsys):
    assert main(["inspect", str(examples["watercolor_kohya_sd15.safetensors"])]) == 0
    out = capsys.readouterr().out
    assert "dialect    kohya" in out
    assert "base       sd15" in out
    assert "targets    264 (text_encoder 72, unet 192)" in out
    assert "triggers   watercolor, painting, 1girl" in out


def test_inspect_json_one_object_per_file(examples, capsys):
    paths = [str(examples[n]) for n in ("lighting_loha_sdxl_sgm.safetensors", "detail_diffusers_sdxl.safetensors")]
    assert main(["inspect", "--json", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert (first["dialect"], first["base"], first["kinds"]) == ("lycoris", "sdxl", ["loha"])
    assert (second["dialect"], second["base"], second["components"]) == (
        "diffusers", "sdxl", {"text_encoder_2": 192, "unet": 32})
    for key in ("dialect", "base", "kinds", "targets", "components", "rank", "metadata", "triggers",
                "unmatched", "warnings"):
        assert key in first
    assert first["rank"] == {"min": 2, "max": 2}
    assert first["triggers"] == ["ohwx dramatic lighting"]


@pytest.mark.parametrize("name, message", [
    ("my_embedding.safetensors", "is a textual-inversion embedding (4 vectors, width 768 -> SD1.x), not a LoRA"),
    ("half_downloaded.safetensors", "the file is truncated or corrupt"),
])
def test_refused_files_exit_2_with_one_line(examples, capsys, name, message):
    assert main(["inspect", str(examples[name])]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"lora-compat: {examples[name]}: ")
    assert message in lines[0]


def test_good_and_bad_files_together_exit_2_but_print_the_good_ones(examples, capsys):
    good = str(examples["watercolor_kohya_sd15.safetensors"])
    assert main(["inspect", "--json", good, str(examples["my_embedding.safetensors"])]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["dialect"] == "kohya"
    assert "textual-inversion" in captured.err


def test_missing_file(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_dialects_lists_every_dialect_and_its_plugin(capsys):
    assert main(["dialects", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    ids = {d["id"]: d for d in listed["dialects"]}
    for dialect in ("kohya", "lycoris", "diffusers", "peft", "xlabs", "bfl", "onetrainer", "bfl-control"):
        assert ids[dialect]["plugin"] == "builtin" and not ids[dialect]["refuses"]
    for refused in ("textual-inversion", "checkpoint", "controlnet", "control-lora", "t2i-adapter"):
        assert ids[refused]["refuses"]
    assert [b["id"] for b in listed["bases"]] == [
        "sd15", "sd2", "sdxl", "flux1", "wan", "flux2", "qwen-image", "z-image", "lumina2", "chroma", "sd3"
    ]
    assert main(["dialects"]) == 0
    assert "kohya" in capsys.readouterr().out


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(EXAMPLES)
    assert "3 LoRAs understood, 2 bad files refused" in capsys.readouterr().out


@pytest.mark.parametrize("args", [[], ["inspect"], ["dialects"], ["demo"]])
def test_help_everywhere(args):
    done = subprocess.run([sys.executable, "-m", "lora_compat", *args, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: lora-compat")


def test_console_script_is_installed():
    done = subprocess.run(["lora-compat", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("lora-compat ")


def _fake_host(root, host):
    root.mkdir()
    names = {"webui": ["launch.py", "webui.py", "modules/"], "comfyui": ["main.py", "nodes.py", "comfy/"]}[host]
    for name in names:
        (root / name.rstrip("/")).mkdir() if name.endswith("/") else (root / name).write_text("")
    return root


@pytest.mark.parametrize("host,folder,marker", [("webui", "extensions", "scripts/lora_compat_script.py"),
                                                ("comfyui", "custom_nodes", "__init__.py")])
def test_install_links_then_is_idempotent_then_copies(tmp_path, capsys, host, folder, marker):
    root = _fake_host(tmp_path / host, host)
    target = root / folder / "lora-compat"
    assert main(["install", host, str(root)]) == 0
    assert target.is_symlink() and (target / marker).is_file()
    assert capsys.readouterr().out.startswith("linked: ")
    assert main(["install", host, str(root)]) == 0
    assert capsys.readouterr().out.startswith("already installed: ")
    assert main(["install", host, str(root), "--copy"]) == 0
    assert not target.is_symlink() and (target / marker).is_file()
    assert main(["install", host, str(root), "--copy"]) == 0  # a copy is refreshed
    assert capsys.readouterr().out.splitlines()[-1].startswith("updated: ")


@pytest.mark.parametrize("host", ["webui", "comfyui"])
def test_install_refuses_a_directory_that_is_not_the_host(tmp_path, capsys, host):
    other = "comfyui" if host == "webui" else "webui"
    root = _fake_host(tmp_path / "x", other)
    assert main(["install", host, str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{root} is not a" in err and "missing" in err
    assert not (root / "extensions").exists() and not (root / "custom_nodes").exists()


def test_install_never_replaces_a_folder_it_did_not_create(tmp_path, capsys):
    root = _fake_host(tmp_path / "webui", "webui")
    (root / "extensions" / "lora-compat").mkdir(parents=True)
    assert main(["install", "webui", str(root)]) == 2
    assert "was not installed by lora-compat" in capsys.readouterr().err
