"""The CLI's single error path, signals, closed pipes, atomic outputs and refused outputs.

Every failing command prints exactly one line on stderr and exits 2, never a traceback; Ctrl-C exits 130 and
SIGTERM 143 with nothing half-written left behind; ``| head`` is silent; outputs appear complete or not at
all, with ordinary permissions, and never over one of their inputs.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_compat.cli import main
from lora_compat.tools.examples import kohya_sd15

@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A full-size SD1.5 kohya LoRA (the demo's)."""
    return kohya_sd15(tmp_path_factory.mktemp("lora") / "watercolor.safetensors")


@pytest.fixture(scope="module")
def small_lora(tmp_path_factory) -> Path:
    """A kohya LoRA on one full-size SD1.5 module: quick to inspect many times."""
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    gen = torch.Generator().manual_seed(0)
    save_file({f"{name}.lora_down.weight": torch.randn(2, 320, generator=gen),
               f"{name}.lora_up.weight": torch.randn(320, 2, generator=gen),
               f"{name}.alpha": torch.tensor(1.0)}, str(path))
    return path


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of a failed command (asserting there is exactly one and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lora-compat {command}: ")
    return lines[0]


@pytest.fixture
def odd_umask():
    """umask 027 while the test runs: output modes must be 0640 / 0750 (not mkstemp's 0600, not 0644)."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def no_temporaries(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*") if ".partial" in p.name]
    assert not leftovers, leftovers


# -- the listed tracebacks: one line, exit 2 ---------------------------------------------------------------
def test_convert_to_an_existing_folder(tmp_path, lora, capsys):
    (tmp_path / "out").mkdir()
    assert main(["convert", str(lora), "--to", "diffusers", "-o", str(tmp_path / "out")]) == 2
    assert "is a folder; the output here is a file" in one_error_line(capsys, "convert")
    assert not any((tmp_path / "out").iterdir())
    no_temporaries(tmp_path)


def test_merge_to_an_existing_folder(tmp_path, lora, capsys):
    (tmp_path / "out").mkdir()
    assert main(["merge", str(lora), "-o", str(tmp_path / "out")]) == 2
    assert "is a folder; the output here is a file" in one_error_line(capsys, "merge")
    no_temporaries(tmp_path)


def test_search_a_file_that_is_not_a_database(tmp_path, capsys):
    db = tmp_path / "notes.txt"
    db.write_text("these are not the tables you are looking for\n" * 100)
    assert main(["search", "cat", "--db", str(db), "--no-semantic"]) == 2
    line = one_error_line(capsys, "search")
    assert f"{db}: not a lora-compat library database" in line
    assert db.read_text().startswith("these are not")


def test_demo_into_an_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["demo", "--dir", str(blocker / "examples")]) == 2
    assert str(blocker) in one_error_line(capsys, "demo")


def test_matrix_with_a_broken_corpus(tmp_path, capsys):
    (tmp_path / "INDEX.json").write_text("{not json")
    assert main(["matrix", "--corpus", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    one_error_line(capsys, "matrix")


def test_an_unexpected_exception_is_one_line_naming_it(monkeypatch, lora, tmp_path, capsys):
    import lora_compat.tools.convert

    def broken(*args, **kwargs):
        raise KeyError("fused_rows")

    monkeypatch.setattr(lora_compat.tools.convert, "convert", broken)
    assert main(["convert", str(lora), "--to", "bfl", "-o", str(tmp_path / "x.safetensors")]) == 2
    line = one_error_line(capsys, "convert")
    assert "internal error: KeyError: 'fused_rows'" in line and "--debug" in line
    assert main(["--debug", "convert", str(lora), "--to", "bfl", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
    assert err.splitlines()[-1] == line


def test_debug_from_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LORA_COMPAT_DEBUG", "1")
    assert main(["index", str(tmp_path / "nope"), "--db", str(tmp_path / "x.db")]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_index_of_a_missing_folder(tmp_path, capsys):
    db = tmp_path / "library.sqlite"
    assert main(["index", str(tmp_path / "nope"), "--db", str(db)]) == 2
    assert f"{tmp_path / 'nope'}: no such folder or file; nothing indexed" in one_error_line(capsys, "index")


@pytest.mark.parametrize("command", ["search", "recommend"])
def test_an_unknown_base_is_refused_with_the_known_ones(tmp_path, small_lora, capsys, command):
    db = str(tmp_path / "library.sqlite")
    assert main(["index", str(small_lora.parent), "--db", db, "--no-semantic", "--quiet"]) == 0
    capsys.readouterr()
    assert main([command, "cat", "--base", "sd99", "--db", db, "--no-semantic"]) == 2
    known = "chroma, flux1, flux2, lumina2, qwen-image, sd15, sd2, sd3, sdxl, wan, z-image"  # every registered base
    assert f"unknown base 'sd99'; known bases: {known}" in one_error_line(capsys, command)
    assert main([command, "cat", "--base", "sdxl", "--db", db, "--no-semantic"]) == 0  # known, nothing indexed


def test_the_library_database_is_created_whole_with_umask_permissions(tmp_path, odd_umask):
    from lora_compat.tools.library import MIGRATIONS, Library

    with Library(tmp_path / "lib.sqlite", semantic=False) as library:
        assert library.schema_version == len(MIGRATIONS)
    assert stat.S_IMODE((tmp_path / "lib.sqlite").stat().st_mode) == 0o640
    no_temporaries(tmp_path)


def test_a_library_database_that_fails_to_be_created_leaves_nothing(tmp_path, monkeypatch, capsys):
    import lora_compat.tools.library.schema as library

    monkeypatch.setattr(library, "MIGRATIONS", (*library.MIGRATIONS[:3], "CREATE TABLE loras (x)"))
    db = tmp_path / "lib.sqlite"
    assert main(["search", "cat", "--db", str(db), "--no-semantic"]) == 2
    assert "table loras already exists" in one_error_line(capsys, "search")
    assert list(tmp_path.iterdir()) == []


# -- convert: unmatched keys are refused unless dropped -------------------------------------------------------
def test_convert_refuses_to_leave_keys_out_unless_asked(tmp_path, small_lora, capsys):
    from safetensors.torch import load_file

    tensors = load_file(str(small_lora))
    tensors["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(4, 2)
    source = tmp_path / "extra.safetensors"
    save_file(tensors, str(source))
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(source), "--to", "diffusers", "-o", str(out)]) == 2
    line = one_error_line(capsys, "convert")
    assert "2 keys map to no module" in line and "lora_unet_no_such_block.lora_down.weight" in line
    assert "--drop-unmatched" in line
    assert not out.exists()
    no_temporaries(tmp_path)
    assert main(["convert", str(source), "--to", "diffusers", "-o", str(out), "--drop-unmatched"]) == 0
    assert out.is_file()
    assert "2 keys of the source matched no module and were left out" in capsys.readouterr().err


def test_merge_refuses_to_leave_keys_out_unless_asked(tmp_path, small_lora, capsys):
    from safetensors.torch import load_file

    tensors = load_file(str(small_lora))
    tensors["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(4, 2)
    source = tmp_path / "extra.safetensors"
    save_file(tensors, str(source))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", f"{small_lora}:0.5", f"{source}:0.5", "-o", str(out)]) == 2
    line = one_error_line(capsys, "merge")
    assert f"{source}: 2 keys map to no module" in line and "lora_unet_no_such_block.lora_down.weight" in line
    assert "--drop-unmatched" in line
    assert not out.exists()
    no_temporaries(tmp_path)
    assert main(["merge", f"{small_lora}:0.5", f"{source}:0.5", "-o", str(out), "--drop-unmatched"]) == 0
    assert out.is_file()
    assert f"{source}: 2 keys matched no module and were left out" in capsys.readouterr().err


# -- outputs never replace their inputs --------------------------------------------------------------------
def test_convert_refuses_to_overwrite_its_input(tmp_path, lora, capsys):
    source = tmp_path / "in.safetensors"
    source.write_bytes(lora.read_bytes())
    assert main(["convert", str(source), "--to", "kohya", "-o", str(source)]) == 2
    assert "refusing to overwrite an input" in one_error_line(capsys, "convert")
    assert source.read_bytes() == lora.read_bytes()
    os.link(source, tmp_path / "hardlink.safetensors")  # the same file by another name
    assert main(["convert", str(source), "--to", "kohya", "-o", str(tmp_path / "hardlink.safetensors")]) == 2
    assert "refusing to overwrite an input" in one_error_line(capsys, "convert")
    assert source.read_bytes() == lora.read_bytes()


def test_merge_refuses_to_overwrite_one_of_its_inputs(tmp_path, lora, small_lora, capsys):
    second = tmp_path / "second.safetensors"
    second.write_bytes(lora.read_bytes())
    assert main(["merge", f"{lora}:0.5", f"{second}:0.5", "-o", str(second)]) == 2
    assert "refusing to overwrite an input" in one_error_line(capsys, "merge")
    assert second.read_bytes() == lora.read_bytes()


def test_convert_and_merge_refuse_to_overwrite_the_checkpoint(tmp_path, small_lora, capsys):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
               torch.zeros(320, 320)}, str(checkpoint))
    before = checkpoint.read_bytes()
    for command in (["convert", str(small_lora), "--to", "kohya"], ["merge", str(small_lora)]):
        assert main([*command, "--checkpoint", str(checkpoint), "-o", str(checkpoint)]) == 2
        assert "refusing to overwrite an input" in one_error_line(capsys, command[0])
    assert checkpoint.read_bytes() == before


def test_bake_refuses_to_overwrite_a_lora_it_reads(tmp_path, small_lora, capsys):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
               torch.zeros(320, 320)}, str(checkpoint))
    copy = tmp_path / "lora.safetensors"
    copy.write_bytes(small_lora.read_bytes())
    assert main(["bake", str(checkpoint), str(copy), "-o", str(copy)]) == 2
    assert "refusing to overwrite an input" in one_error_line(capsys, "bake")
    assert copy.read_bytes() == small_lora.read_bytes()


# -- permissions ---------------------------------------------------------------------------------------------
def test_outputs_get_umask_permissions(tmp_path, lora, small_lora, odd_umask, capsys):
    assert main(["convert", str(lora), "--to", "diffusers", "-o", str(tmp_path / "c.safetensors")]) == 0
    assert main(["convert", str(small_lora), "--to", "peft", "-o", str(tmp_path / "peft")]) == 0
    assert main(["merge", str(lora), "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["demo", "--dir", str(tmp_path / "demo")]) == 0
    files = [tmp_path / "c.safetensors", tmp_path / "m.safetensors", *(tmp_path / "demo").iterdir(),
             *(tmp_path / "peft").iterdir()]
    assert len(files) == 2 + 5 + 2
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert stat.S_IMODE((tmp_path / "peft").stat().st_mode) == 0o750
    no_temporaries(tmp_path)


def _tiny_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A diffusers-layout checkpoint folder with one UNet module, and a LoRA on it."""
    (folder / "ckpt" / "unet").mkdir(parents=True)
    save_file({"blocks.0.proj.weight": torch.randn(16, 16)},
              str(folder / "ckpt" / "unet" / "diffusion_pytorch_model.safetensors"))
    (folder / "ckpt" / "model_index.json").write_text("{}")
    save_file({"unet.blocks.0.proj.lora_A.weight": torch.randn(2, 16),
               "unet.blocks.0.proj.lora_B.weight": torch.randn(16, 2)}, str(folder / "lora.safetensors"))
    return folder / "ckpt", folder / "lora.safetensors"


def test_bake_outputs_get_umask_permissions(tmp_path, odd_umask, capsys):
    checkpoint, lora = _tiny_checkpoint(tmp_path)
    assert main(["bake", str(checkpoint), str(lora), "-o", str(tmp_path / "baked")]) == 0
    assert stat.S_IMODE((tmp_path / "baked").stat().st_mode) == 0o750
    weights = tmp_path / "baked" / "unet" / "diffusion_pytorch_model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o640
    capsys.readouterr()
    assert main(["bake", str(checkpoint), str(lora), "-o", str(tmp_path / "baked")]) == 2  # not empty: kept
    assert "exists and is not empty" in one_error_line(capsys, "bake")
    assert weights.is_file()
    no_temporaries(tmp_path)


# -- closed pipes and signals --------------------------------------------------------------------------------
def test_inspect_into_a_closed_pipe_is_silent(small_lora):
    """A real shell pipe: ``inspect | head -1`` prints one line, nothing on stderr, and exits 141."""
    paths = " ".join([str(small_lora)] * 400)  # ~100 KB of tables: the pipe closes long before the end
    script = f"{sys.executable} -m lora_compat inspect {paths} 2>{small_lora.parent / 'err.txt'} | head -1; " \
             "echo \"status ${PIPESTATUS[0]}\""
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert done.stdout.splitlines() == [f"file       {small_lora}", "status 141"]
    assert (small_lora.parent / "err.txt").read_text() == ""


def test_broken_pipe_in_process(small_lora, monkeypatch):
    """The same path in process: the first write after the reader has gone raises BrokenPipeError."""
    class ClosedAfterOneLine:
        def __init__(self):
            self.lines = 0

        def write(self, text):
            self.lines += text.count("\n")
            if self.lines > 1:
                raise BrokenPipeError(32, "Broken pipe")
            return len(text)

        def flush(self):
            if self.lines > 1:
                raise BrokenPipeError(32, "Broken pipe")

    errors = []
    monkeypatch.setattr(sys, "stdout", ClosedAfterOneLine())
    monkeypatch.setattr(sys, "stderr", type("E", (), {"write": lambda s, t: errors.append(t), "flush": lambda s: None})())
    assert main(["inspect", "--json", *[str(small_lora)] * 5]) == 141
    assert errors == []


SLOW_BAKE = """
import sys, time
from pathlib import Path
import lora_compat.tools.bake as bake

marker = Path(sys.argv[1])
write = bake._StreamWriter.write

def slow_write(self, key, tensor):  # after the first tensor: say so, then take our time
    write(self, key, tensor)
    marker.write_text(str(self.path))
    time.sleep(0.2)

bake._StreamWriter.write = slow_write
from lora_compat.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signum, status, word", [(signal.SIGTERM, 143, "terminated"),
                                                  (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_a_signal_during_bake_leaves_nothing_behind(tmp_path, signum, status, word, layout):
    """Killed while writing (the writer is slowed down after its first tensor): no output, no temporary."""
    from lora_compat.archs import SD15
    from lora_compat.archs.sd import sgm_aliases

    attention = [(sgm, path) for sgm, path in sgm_aliases(SD15.index.components["unet"]).items()
                 if path.endswith((".to_q", ".to_k", ".to_v"))][:30]
    if layout == "file":  # SGM names, as in a single-file SD checkpoint
        checkpoint = tmp_path / "model.safetensors"
        tensors = {f"model.diffusion_model.{sgm}.weight": torch.randn(16, 16) for sgm, _ in attention}
        tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(16, 4, 3, 3)  # conv_in: SGM
        save_file(tensors, str(checkpoint))
        out = tmp_path / "out" / "baked.safetensors"
    else:
        checkpoint = tmp_path / "ckpt"
        (checkpoint / "unet").mkdir(parents=True)
        save_file({f"{path}.weight": torch.randn(16, 16) for _, path in attention},
                  str(checkpoint / "unet" / "diffusion_pytorch_model.safetensors"))
        out = tmp_path / "out" / "baked"
    module = attention[0][1]
    save_file({f"unet.{module}.lora_A.weight": torch.randn(2, 16), f"unet.{module}.lora_B.weight": torch.randn(16, 2)},
              str(tmp_path / "lora.safetensors"))
    marker = tmp_path / "writing"
    process = subprocess.Popen([sys.executable, "-c", SLOW_BAKE, str(marker), "bake", str(checkpoint),
                                str(tmp_path / "lora.safetensors"), "-o", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert Path(marker.read_text()).exists()  # the temporary being written, beside the output
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == f"lora-compat bake: {word}"
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_output_removes_its_temporary_on_any_exception(tmp_path):
    from lora_compat.outputs import atomic_output

    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"new, half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    with atomic_output(target) as temporary:
        temporary.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


# -- search says what it loads --------------------------------------------------------------------------------
def test_semantic_search_says_what_it_loads(tmp_path, small_lora, monkeypatch, capsys):
    import functools

    import lora_compat.tools.library.retrieval as retrieval
    from lora_compat.tools.library import Library

    db = str(tmp_path / "library.sqlite")
    assert main(["index", str(small_lora.parent), "--db", db, "--no-semantic", "--quiet"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(retrieval, "load_embedder", functools.lru_cache(maxsize=1)(lambda: None))  # a cold one
    monkeypatch.setattr(retrieval, "semantic_available", lambda: True)
    monkeypatch.setattr("lora_compat.tools.library.store.semantic_available", lambda: True)
    monkeypatch.setattr(Library, "search", lambda self, *a, **k: [])
    assert main(["search", "cat", "--db", db, "--semantic"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lora-compat search: loading the semantic search model (all-MiniLM-L6-v2")
    assert main(["search", "cat", "--db", db, "--no-semantic"]) == 0
    assert capsys.readouterr().err == ""
