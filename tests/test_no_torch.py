"""Header work without torch: ``inspect``, ``dialects``, ``index``, ``search`` and ``recommend`` run in a process
where importing torch fails, and print exactly what they print with torch imported."""
from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_compat.archs import SDXL
from lora_compat.archs.sd import sgm_aliases
from lora_compat.tools.examples import ATTENTION_LEAVES, TEXT_LEAVES, write_examples

from lora_pool import lora_files

#: runs ``lora_compat.cli.main`` on each argv of a JSON list; "block" makes every import of torch fail
RUNNER = r"""
import contextlib, importlib.abc, io, json, sys

attempts = []

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

mode, commands = sys.argv[1], json.loads(sys.argv[2])
if mode == "block":
    sys.meta_path.insert(0, BlockTorch())
else:
    import torch
from lora_compat.cli import main

results = []
for argv in commands:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps({"results": results, "torch": "torch" in sys.modules, "attempts": attempts}))
"""


def run(mode: str, commands: list[list[str]]) -> dict:
    done = subprocess.run([sys.executable, "-c", RUNNER, mode, json.dumps(commands)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_same_without_torch(commands: list[list[str]], reference: list[list[str]] | None = None,
                              normalise: Callable[[str], str] = lambda text: text) -> list[dict]:
    """Each command in its own process with torch blocked, and the ``reference`` commands (by default the same)
    in one process with torch imported: same exit codes, same output."""
    expected = run("torch", reference or commands)
    assert expected["torch"]
    results = []
    for argv, want in zip(commands, expected["results"], strict=True):
        blocked = run("block", [argv])
        assert blocked["attempts"] == [] and not blocked["torch"], argv
        got = blocked["results"][0]
        assert (got["code"], normalise(got["stdout"]), normalise(got["stderr"])) == (
            want["code"], normalise(want["stdout"]), normalise(want["stderr"])), argv
        results.append(got)
    return results


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> Path:
    """An F16 safetensors file with these shapes whose data section is a hole (zeros, next to nothing on disk)."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def kohya_sdxl_full(path: Path, rank: int = 4) -> Path:
    """An sd-scripts SDXL LoRA on SGM names: every UNet attention / resnet layer and both text encoders."""
    index = SDXL.index.components
    sgm = {module: alias for alias, module in sgm_aliases(index["unet"]).items()}
    modules = {f"lora_unet_{sgm[m].replace('.', '_')}": p["weight"] for m, p in index["unet"].items()
               if m.endswith(ATTENTION_LEAVES + (".conv1", ".conv2", ".time_emb_proj")) and m in sgm}
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for m, params in index[component].items():
            if m.endswith(TEXT_LEAVES):
                name = "text_model." + m.removeprefix("text_model.")
                modules[prefix + name.replace(".", "_")] = params["weight"]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, weight in modules.items():
        kernel = weight[2:]
        shapes[f"{name}.alpha"] = ()
        shapes[f"{name}.lora_down.weight"] = (rank, weight[1], *kernel)
        shapes[f"{name}.lora_up.weight"] = (weight[0], rank, *[1] * len(kernel))
    metadata = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
                "ss_output_name": "ink_sketch",
                "ss_tag_frequency": json.dumps({"5_ink": {"ink sketch": 30, "monochrome": 9}})}
    return write_sparse_safetensors(path, shapes, metadata)


def flux_control(path: Path, rank: int = 2) -> Path:
    """A FLUX.1 Control LoRA (BFL names, full-size shapes): widened img_in, fused qkv / linear1, a norm scale."""
    rows = {"img_in": (3072, 128), "double_blocks.0.img_attn.qkv": (9216, 3072),
            "single_blocks.0.linear1": (21504, 3072)}
    tensors = {}
    for module, (out, width) in rows.items():
        tensors[f"{module}.lora_A.weight"] = torch.zeros(rank, width)
        tensors[f"{module}.lora_B.weight"] = torch.zeros(out, rank)
        tensors[f"{module}.lora_B.bias"] = torch.zeros(out)
    tensors["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(128)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("no-torch")
    paths = write_examples(root / "examples")  # three dialects, an embedding and a truncated file
    paths += [kohya_sdxl_full(root / "ink_sketch_sdxl.safetensors"), flux_control(root / "depth_flux.safetensors")]
    return paths + sorted(lora_files().values())  # every LyCORIS kind and a PEFT DoRA


def test_inspect_without_torch(files):
    paths = list(map(str, files))
    json_run, table_run = assert_same_without_torch([["inspect", "--json", *paths], ["inspect", *paths]])
    assert json_run["code"] == table_run["code"] == 2  # the embedding and the truncated file
    assert json_run["stderr"].count("\n") == 2
    reports = [json.loads(line) for line in json_run["stdout"].splitlines()]
    assert len(reports) == len(paths) - 2
    # the files cover the dialects and every patch kind
    assert {r["dialect"] for r in reports} == {"kohya", "lycoris", "diffusers", "bfl-control"}
    assert {k for r in reports for k in r["kinds"]} == {
        "lora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "norm", "dora", "set", "widen"}
    sdxl = next(r for r in reports if r["file"].endswith("ink_sketch_sdxl.safetensors"))
    assert (sdxl["base"], sdxl["unmatched"], sdxl["tensors"]) == ("sdxl", [], 3 * sdxl["targets"])
    assert next(r for r in reports if r["dialect"] == "bfl-control")["base"] == "flux1"


def test_dialects_without_torch():
    json_run, _ = assert_same_without_torch([["dialects", "--json"], ["dialects"]])
    assert "bfl-control" in {d["id"] for d in json.loads(json_run["stdout"])["dialects"]}


def test_library_commands_without_torch(files, tmp_path):
    folder = files[0].parent.parent
    blocked_db, torch_db = tmp_path / "blocked" / "library.sqlite", tmp_path / "torch" / "library.sqlite"

    def commands(db: Path) -> list[list[str]]:
        return [["index", str(folder), "--no-semantic", "--quiet", "--db", str(db)],
                ["search", "ink sketch", "--no-semantic", "--json", "--db", str(db)],
                ["search", "watercolor", "--no-semantic", "--db", str(db)],
                ["recommend", "a watercolor of a lighthouse", "--base", "sd15", "--no-semantic", "--json",
                 "--db", str(db)]]

    def normalise(text: str) -> str:  # each run names its own database and the time indexing took
        return re.sub(r"\(\d+\.\d s\)", "(T s)", text.replace(str(torch_db), str(blocked_db)))

    index, search, _, recommend = assert_same_without_torch(commands(blocked_db), commands(torch_db), normalise)
    assert index["stdout"].startswith(f"{blocked_db}: 5 added, 0 updated, 0 unchanged, 0 removed, 2 not indexed")
    assert json.loads(search["stdout"])[0]["path"].endswith("ink_sketch_sdxl.safetensors")
    assert json.loads(recommend["stdout"])["stack"][0]["path"].endswith("watercolor_kohya_sd15.safetensors")


def test_tensor_math_imports_torch_when_first_needed(files, tmp_path):
    """After header work in a fresh process, the patches' numeric methods import torch themselves."""
    path = next(p for p in files if p.name == "watercolor_kohya_sd15.safetensors")
    target = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    code = ("import sys, lora_compat; patchset = lora_compat.read(sys.argv[1]); assert 'torch' not in sys.modules; "
            f"delta = patchset[{target!r}].weight_delta((320, 320)); assert 'torch' in sys.modules; "
            "import torch; torch.save(delta, sys.argv[2])")
    out = tmp_path / "delta.pt"
    subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True)
    tensors = load_file(str(path))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
    scale = tensors[f"{name}.alpha"].float().item() / down.shape[0]
    torch.testing.assert_close(torch.load(out), (up @ down) * scale, rtol=0, atol=0)


def test_dora_epsilon_is_float32_machine_epsilon():
    from lora_compat.patches import dora

    assert dora.EPS == torch.finfo(torch.float32).eps
