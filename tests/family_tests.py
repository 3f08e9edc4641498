"""Helpers shared by the family tests (Chroma, SD3): tiny random models, header-only
files and the comparison against an oracle's fused weights."""
from __future__ import annotations

from typing import Callable

import torch

from lora_compat.files import Header, LoraFile


def random_model(make: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """``make()`` with every parameter (biases and norm weights too) drawn from N(0, 0.2²), in eval mode."""
    torch.manual_seed(seed)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                   fused_rows: bool = False) -> None:
    """``got`` changes every weight ``expected`` changed and only those, each within 1e-5 of the change.
    ``fused_rows``: a file in a fused layout also carries the zero rows of the parts a partial LoRA leaves out:
    their weights come back bit-identical."""
    changed = sorted(k for k in expected if not torch.equal(expected[k], base[k]))
    if fused_rows:
        got = {k: v for k, v in got.items() if k in changed or not torch.equal(v, base[k])}
    assert changed and sorted(got) == changed
    for name in changed:
        err = (got[name] - expected[name]).norm() / (expected[name] - base[name]).norm()
        assert err < 1e-5, (name, float(err))


def split_merge(model: torch.nn.Module, parts: tuple[str, ...], delta: torch.Tensor, strength: float,
                component: str = "transformer") -> dict[str, torch.Tensor]:
    """``W + strength * delta`` for the modules a fused module stacks by rows (``parts``, in row order), each
    taking its own rows of ``delta``."""
    merged, row = {}, 0
    for part in parts:
        weight = model.get_submodule(part).weight
        merged[f"{component}.{part}.weight"] = weight + strength * delta[row:row + weight.shape[0]]
        row += weight.shape[0]
    return merged


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    """The same parameters, each within ``tol`` relative error of the expected value."""
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert (got[name] - value).norm() <= tol * value.norm(), name


def header_file(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> LoraFile:
    """A LoRA known by its header alone (no tensor is read)."""
    return LoraFile(Header(shapes, {k: "F16" for k in shapes}, metadata or {}),
                    lambda k: (_ for _ in ()).throw(AssertionError(k)), "memory")


def lora(modules: dict[str, tuple[int, int]], down: str = "lora_A.weight", up: str = "lora_B.weight",
         alpha: bool = False) -> dict[str, tuple[int, ...]]:
    """Rank-1 LoRA key shapes on ``{module name: (rows, columns)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out, inp) in modules.items():
        shapes.update({f"{name}.{down}": (1, inp), f"{name}.{up}": (out, 1)})
        if alpha:
            shapes[f"{name}.alpha"] = ()
    return shapes


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) <-> (scale, shift) along dim 0 (diffusers' ``swap_scale_shift``)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])
