"""Whole-delta operations (``convert --rank``, ``merge --method svd|ties|dare``) on LoRAs of models that fit no
full-size base, and on kinds that need the base weights (``--checkpoint``).

Oracles: LyCORIS' own forward pass (``write_lycoris_file``'s expected weights) for the deltas, numpy-free
closed forms written here from the files' raw tensors for the element-wise merges, and ``torch.linalg.svd``
of the oracle deltas for the truncations.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat.cli import main
from lora_compat.tools.merge import merge

from lora_compat.oracles.lycoris_oracle import write_lycoris_file
from lora_compat.oracles.models import make_sd15_components
from sd_checkpoints import single_file_tensors
from merge_references import dare_reference, ties_reference

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)
WEIGHTS = (0.5, -0.3, 0.8)


@pytest.fixture(scope="module")
def sd15():
    return make_sd15_components(seed=100)


@pytest.fixture(scope="module")
def base(sd15) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach() for c, m in sd15.items() for n, p in m.named_parameters()}


@pytest.fixture(scope="module")
def files(sd15, tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """LyCORIS files on the tiny SD1.5 (shapes of no full-size base) and the weights LyCORIS' forward gives."""
    made = {}
    for variant in ("lora", "loha", "lokr", "full", "dora_out", "diag_oft", "ia3", "glora"):
        made[variant] = write_lycoris_file(tmp_path_factory.mktemp(variant), sd15, variant, seed=11)
    return made


@pytest.fixture(scope="module")
def checkpoint(sd15, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("checkpoint")
    sd15["unet"].save_pretrained(folder / "unet")
    sd15["text_encoder"].save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def single_file_checkpoint(sd15, tmp_path_factory) -> Path:
    """The same model as one file under SGM / LDM names (as bake reads them)."""
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_file(single_file_tensors(sd15), str(path))
    return path


def _key(target: str) -> str:
    """A canonical target or a parameter key, without ``text_model.`` (the two spellings of CLIP paths)."""
    return target.replace("text_model.", "")


def oracle_deltas(expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module → ΔW (2-D, out x in·k·k) that LyCORIS' forward pass applies."""
    return {_key(k[: -len(".weight")]): (v - base[k]).flatten(1) for k, v in expected.items()
            if k.endswith(".weight") and base[k].dim() >= 2}


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()


def diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """module → ΔW (2-D) of a diffusers-dialect file: alpha/r · B @ A, alpha from ``lora_adapter_metadata``."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        flat = json.loads(handle.metadata()["lora_adapter_metadata"])
    out = {}
    for key, down in tensors.items():
        if key.endswith(".lora_A.weight"):
            target = key[: -len(".lora_A.weight")]
            component, _, module = target.partition(".")
            up = tensors[f"{target}.lora_B.weight"]
            alpha = flat[f"{component}.alpha_pattern"][module]
            out[_key(target)] = (up.flatten(1) @ down.flatten(1)) * (alpha / down.shape[0])
    return out


def hand_deltas(path: Path) -> dict[str, torch.Tensor]:
    """kohya name → ΔW (2-D) from the raw tensors of a LoRA / LoHa / LoKr file, by the closed forms."""
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    out = {}
    for name in sorted({k.split(".")[0] for k in tensors}):
        get = lambda suffix: tensors.get(f"{name}.{suffix}")  # noqa: E731
        alpha = get("alpha")
        if get("lora_down.weight") is not None:
            down, up = get("lora_down.weight").flatten(1), get("lora_up.weight").flatten(1)
            out[name] = (up @ down) * (float(alpha) / down.shape[0])
        elif get("hada_w1_a") is not None:
            w1b = get("hada_w1_b")
            first, second = get("hada_w1_a") @ w1b, get("hada_w2_a") @ get("hada_w2_b")
            out[name] = ((first * second) * (float(alpha) / w1b.shape[0])).flatten(1)
        elif get("lokr_w1") is not None or get("lokr_w1_a") is not None:
            w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
            w2 = get("lokr_w2") if get("lokr_w2") is not None else get("lokr_w2_a") @ get("lokr_w2_b")
            low = get("lokr_w2_b") if get("lokr_w2_b") is not None else get("lokr_w1_b")
            scale = 1.0 if low is None else float(alpha) / low.shape[0]
            out[name] = torch.kron(w1, w2.flatten(1)) * scale
    return out


def kohya_name(target: str) -> str:
    """A module's kohya name, CLIP paths without ``text_model`` (as :func:`flat` spells file names)."""
    component, _, path = _key(target).partition(".")
    return ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")


def flat(name: str) -> str:
    """A kohya name from a file, CLIP paths without ``text_model`` (writers spell them either way)."""
    return name.replace("lora_te_text_model_", "lora_te_")


def hand_by_module(path: Path, expected, base) -> dict[str, torch.Tensor]:
    """hand_deltas keyed by module like the oracle, after checking them against LyCORIS' forward pass."""
    oracle = oracle_deltas(expected, base)
    names = {kohya_name(k): k for k in oracle}
    hand = {names[flat(n)]: d for n, d in hand_deltas(path).items()}
    assert hand.keys() == oracle.keys()
    for module, delta in hand.items():
        assert torch.allclose(delta, oracle[module], rtol=1e-4, atol=1e-6), module
    return hand


# -- from the files alone -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["loha", "lokr", "full"])
def test_convert_rank_works_from_the_file_alone(tmp_path, files, base, variant, capsys):
    path, expected = files[variant]
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(path), "--to", "diffusers", "--rank", "2", "-o", str(out)]) == 0
    assert "components=" not in capsys.readouterr().err
    got, oracle = diffusers_deltas(out), oracle_deltas(expected, base)
    assert got.keys() == oracle.keys()
    for module, delta in oracle.items():
        assert float((got[module] - truncated(delta, 2)).norm()) <= 1e-4 * float(delta.norm()), module
    biases = {_key(k[: -len(".lora_B.bias")]): v for k, v in load_file(str(out)).items() if k.endswith(".lora_B.bias")}
    changed = {_key(k[: -len(".bias")]): v - base[k] for k, v in expected.items() if k.endswith(".bias")}
    assert biases.keys() == changed.keys() and (variant == "full") == bool(biases)
    for module, delta in changed.items():  # alpha = rank for compressed modules: lora_B.bias is Δb itself
        assert torch.allclose(biases[module], delta, rtol=1e-5, atol=1e-7), module


def test_merge_svd_works_from_the_files_alone(tmp_path, files, base):
    sources = [files[v] for v in ("lora", "loha", "lokr")]
    out = tmp_path / "svd.safetensors"
    args = [f"{p}:{w}" for (p, _), w in zip(sources, WEIGHTS)]
    assert main(["merge", *args, "--method", "svd", "--rank", "3", "--to", "diffusers", "-o", str(out)]) == 0
    oracles = [oracle_deltas(e, base) for _, e in sources]
    got = diffusers_deltas(out)
    assert got.keys() == oracles[0].keys()
    for module in got:
        total = sum(w * o[module] for w, o in zip(WEIGHTS, oracles))
        assert float((got[module] - truncated(total, 3)).norm()) <= 1e-4 * float(total.norm()), module


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_merge_ties_and_dare_work_from_the_files_alone(tmp_path, files, base, method):
    sources = [files[v] for v in ("lora", "loha", "lokr")]
    out = tmp_path / f"{method}.safetensors"
    args = [f"{p}:{w}" for (p, _), w in zip(sources, WEIGHTS)]
    assert main(["merge", *args, "--method", method, "--density", "0.4", "--seed", "3", "-o", str(out)]) == 0
    hands = [hand_by_module(p, e, base) for p, e in sources]
    diffs = {flat(k[: -len(".diff")]): v.flatten(1) for k, v in load_file(str(out)).items() if k.endswith(".diff")}
    targets = {kohya_name(t): t for t in lora_compat.read(sources[0][0])}
    assert len(diffs) == len(hands[0])
    for name, value in diffs.items():
        module = _key(targets[name])
        parts = [h[module] for h in hands]
        if method == "ties":
            want = ties_reference(parts, WEIGHTS, 0.4)
        else:
            want = dare_reference(targets[name], parts, WEIGHTS, 0.4, 3)
        assert torch.allclose(value, want, rtol=1e-5, atol=1e-7), name


# -- kinds that need the base weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant, kind", [("dora_out", "dora"), ("diag_oft", "oft"), ("ia3", "ia3"),
                                           ("glora", "glora")])
def test_kinds_that_need_the_base_ask_for_a_checkpoint(tmp_path, files, variant, kind, capsys):
    path, _ = files[variant]
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(path), "--to", "diffusers", "--rank", "4", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert f"its {kind} patch depends on the base weights" in err and "pass --checkpoint PATH" in err
    assert main(["merge", f"{path}:0.5", f"{files['lora'][0]}:0.5", "--method", "ties", "-o", str(out)]) == 2
    assert "pass --checkpoint PATH" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("variant, layout", [("dora_out", "folder"), ("diag_oft", "folder"), ("ia3", "folder"),
                                             ("glora", "folder"), ("dora_out", "single-file"),
                                             ("diag_oft", "single-file")])
def test_convert_rank_with_a_checkpoint(tmp_path, files, base, checkpoint, single_file_checkpoint, variant, layout):
    path, expected = files[variant]
    ckpt = checkpoint if layout == "folder" else single_file_checkpoint
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(path), "--to", "diffusers", "--rank", "1024", "--checkpoint", str(ckpt),
                 "-o", str(out)]) == 0
    got, oracle = diffusers_deltas(out), oracle_deltas(expected, base)
    assert got.keys() == oracle.keys()
    for module, delta in oracle.items():  # rank 1024 keeps every singular value: exact up to fp32
        assert float((got[module] - delta).norm()) <= 1e-4 * float(delta.norm()), module


def test_merge_with_a_checkpoint_python_api(tmp_path, files, base, checkpoint):
    sources = [files[v] for v in ("dora_out", "diag_oft", "loha")]
    out = tmp_path / "svd.safetensors"
    merge([(p, w) for (p, _), w in zip(sources, WEIGHTS)], out, "svd", rank=1024, to="diffusers",
                      checkpoint=checkpoint)
    oracles = [oracle_deltas(e, base) for _, e in sources]
    got = diffusers_deltas(out)
    assert got.keys() == oracles[0].keys()
    for module in got:
        total = sum(w * o[module] for w, o in zip(WEIGHTS, oracles))
        assert float((got[module] - total).norm()) <= 1e-4 * float(total.norm()), module
