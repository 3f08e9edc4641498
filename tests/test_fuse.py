"""``merge``: concat is the exact weighted sum; svd reports the error it makes; TIES and DARE equal an
independent implementation written from PEFT's definitions (merge_references.py); linear only where exact."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat import LoraCompatError
from lora_compat.cli import main
from lora_compat.tools.merge import merge

from lora_compat.oracles.lycoris_oracle import write_lycoris_file
from lora_compat.oracles.models import make_sd15_components
from merge_references import dare_reference, ties_reference

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)
WEIGHTS = (0.7, -0.4)


@pytest.fixture(scope="module")
def sd15():
    return make_sd15_components(seed=100)


@pytest.fixture(scope="module")
def two_loras(sd15, tmp_path_factory) -> list[Path]:
    paths = []
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"lora{seed}")
        paths.append(write_lycoris_file(folder, sd15, "lora", seed=seed)[0])
    return paths


def raw_deltas(path: Path) -> dict[str, torch.Tensor]:
    """module name (``text_model_`` dropped) → alpha/rank · up @ down, from the file's own tensors."""
    tensors = load_file(str(path))
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key].float(), tensors[f"{name}.lora_up.weight"].float()
            alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
            delta = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
            out[name.replace("text_model_", "")] = delta.reshape(up.shape[0], *down.shape[1:])
    return out


def merged_diffs(path: Path) -> dict[str, torch.Tensor]:
    return {k[: -len(".diff")].replace("text_model_", ""): v for k, v in load_file(str(path)).items()
            if k.endswith(".diff")}


def test_concat_is_the_weighted_sum(tmp_path: Path, sd15, two_loras) -> None:
    out = tmp_path / "concat.safetensors"
    report = merge(list(zip(two_loras, WEIGHTS)), out, "concat", components=sd15)
    assert report.modules == lora_compat.inspect(two_loras[0]).targets
    info, sources = lora_compat.inspect(out), [lora_compat.inspect(p) for p in two_loras]
    assert info.kinds == ["lora"]
    assert info.rank == {k: sum(s.rank[k] for s in sources) for k in ("min", "max")}  # ranks add up
    got = lora_compat.patched_weights(out, sd15)
    copies = {k: copy.deepcopy(m) for k, m in sd15.items()}
    lora_compat.Patcher(copies).set(list(zip(two_loras, WEIGHTS)))
    want = {f"{c}.{n}": p for c, m in copies.items() for n, p in m.named_parameters()}
    for key, value in got.items():
        assert float((value - want[key]).norm() / want[key].norm()) < 1e-6, key
    # and against the files' own tensors: W + 0.7 ΔW₁ − 0.4 ΔW₂ (ΔW = alpha/rank · up @ down)
    deltas = [raw_deltas(p) for p in two_loras]
    base = {f"{c}.{n}": p.detach() for c, m in sd15.items() for n, p in m.named_parameters()}
    assert len(got) == report.modules and all(key.endswith(".weight") for key in got)
    for key, value in got.items():
        name = next(n for n in deltas[0] if n.endswith(key.partition(".")[2][: -len(".weight")].replace(".", "_")))
        exact = base[key] + (WEIGHTS[0] * deltas[0][name] + WEIGHTS[1] * deltas[1][name]).reshape(value.shape)
        assert float((value - exact).norm() / exact.norm()) < 1e-6, key


@pytest.mark.parametrize("rank", [1, 4])
def test_svd_reports_the_error_it_makes(tmp_path: Path, sd15, two_loras, rank: int) -> None:
    out = tmp_path / "svd.safetensors"
    report = merge(list(zip(two_loras, WEIGHTS)), out, "svd", rank=rank, components=sd15)
    deltas = [raw_deltas(p) for p in two_loras]
    base = {f"{c}.{n}": p.detach() for c, m in sd15.items() for n, p in m.named_parameters()}
    got = lora_compat.patched_weights(out, sd15)
    num = den = 0.0
    for target, reported in report.svd_errors.items():
        key = f"{target}.weight"
        want = got[key] - base[key]
        name = next(n for n in deltas[0] if n.endswith(target.partition(".")[2].replace(".", "_")))
        exact = WEIGHTS[0] * deltas[0][name] + WEIGHTS[1] * deltas[1][name]
        measured = float((want - exact.reshape(want.shape)).norm() / exact.norm())
        assert measured == pytest.approx(reported, rel=1e-3, abs=1e-5), target
        num += (measured * float(exact.norm())) ** 2
        den += float(exact.norm()) ** 2
    assert (num / den) ** 0.5 == pytest.approx(report.overall_error, rel=1e-3)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_equal_an_independent_implementation(tmp_path: Path, sd15, two_loras, method: str) -> None:
    out = tmp_path / f"{method}.safetensors"
    merge(list(zip(two_loras, WEIGHTS)), out, method, density=0.3, seed=7, components=sd15)
    assert lora_compat.inspect(out).kinds == ["full"]
    got = merged_diffs(out)
    deltas = [raw_deltas(p) for p in two_loras]
    patchset = lora_compat.read(two_loras[0])
    targets = {t.partition(".")[2].replace(".", "_"): t for t in patchset}
    assert got.keys() == deltas[0].keys()
    for name, value in got.items():
        parts = [d[name] for d in deltas]
        if method == "ties":
            want = ties_reference(parts, WEIGHTS, 0.3)
        else:
            target = next(t for flat, t in targets.items() if name.endswith(flat))
            want = dare_reference(target, parts, WEIGHTS, 0.3, 7)
        assert torch.allclose(value, want.reshape(value.shape), rtol=1e-5, atol=1e-7), name


def test_linear_only_where_exact(tmp_path: Path, sd15, two_loras) -> None:
    with pytest.raises(LoraCompatError, match=r"linear merging of LoRA factors is exact only when the LoRAs share"):
        merge(list(zip(two_loras, WEIGHTS)), tmp_path / "x.safetensors", "linear", components=sd15)
    tensors = load_file(str(two_loras[0]))
    shared = {k: (v * 2 if k.endswith(".lora_up.weight") else v) for k, v in tensors.items()}
    save_file(shared, str(tmp_path / "same_down.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    out = tmp_path / "linear.safetensors"
    merge([(two_loras[0], 0.5), (tmp_path / "same_down.safetensors", 0.25)], out, "linear", components=sd15)
    base = {f"{c}.{n}": p.detach() for c, m in sd15.items() for n, p in m.named_parameters()}
    got = lora_compat.patched_weights(out, sd15)
    single = lora_compat.patched_weights(two_loras[0], sd15)  # 0.5·Δ + 0.25·2Δ = Δ
    for key in got:
        assert float((got[key] - single[key]).norm() / (single[key] - base[key]).norm()) < 1e-5, key


def test_cli_merge(tmp_path: Path, two_loras, capsys) -> None:
    out = tmp_path / "m.safetensors"
    args = ["merge", f"{two_loras[0]}:0.7", f"{two_loras[1]}:0.3", "-o", str(out), "--method", "concat"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: concat of 2 LoRAs")
    assert main(["merge", str(two_loras[0]), "-o", str(out), "--method", "svd"]) == 2
    assert "needs a rank" in capsys.readouterr().err
