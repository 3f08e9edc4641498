"""One exact LoRA for a fused module from LoRA parts on its row ranges (``patches.rows.fused_lora``), and the
one fused patch both the patcher and the host converters use."""
from __future__ import annotations

import torch

from lora_compat.archs.routes import Route
from lora_compat.patches import Ref, Scale
from lora_compat.patches.loha import LohaPatch
from lora_compat.patches.lora import LoraPatch
from lora_compat.patches.fused import FusedPatch, fused_lora


def _lora(out: int, rank: int, alpha: float, seed: int) -> tuple[LoraPatch, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    up, down = torch.randn(out, rank, generator=gen), torch.randn(rank, 6, generator=gen)
    return LoraPatch(Ref.of(up, "up"), Ref.of(down, "down"), Scale(alpha, rank)), (alpha / rank) * up @ down


def _change(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    return (float(tensors["alpha"]) / down.shape[0]) * up @ down


def test_parts_on_rows_assemble_exactly_with_uncovered_rows_zero():
    first, first_delta = _lora(3, 2, 1.0, 0)
    second, second_delta = _lora(4, 3, 6.0, 1)
    parts = [(Route("qkv", 5, 9), second), (Route("qkv", 0, 3), first)]
    tensors = fused_lora(parts, 12)
    expected = torch.zeros(12, 6)
    expected[0:3], expected[5:9] = first_delta, second_delta
    assert tensors["lora_down.weight"].shape == (5, 6) and float(tensors["alpha"]) == 5.0
    torch.testing.assert_close(_change(tensors), expected, rtol=1e-6, atol=1e-6)
    assert FusedPatch(parts).host_native()


def test_swapped_halves_are_swapped_back():
    patch, delta = _lora(8, 2, 2.0, 2)
    tensors = fused_lora([(Route("adaLN", 0, 8, swap=True), patch)], 8)
    torch.testing.assert_close(_change(tensors), torch.cat([delta[4:], delta[:4]]), rtol=1e-6, atol=1e-6)
    assert not FusedPatch([(Route("adaLN", 0, 8, swap=True), patch)]).host_native()


def test_a_part_with_no_lora_form_is_left_to_the_caller():
    lora, _ = _lora(3, 2, 1.0, 3)
    loha = LohaPatch(*(Ref.of(torch.randn(*shape), name) for shape, name in
                       (((3, 2), "w1a"), ((2, 6), "w1b"), ((3, 2), "w2a"), ((2, 6), "w2b"))))
    parts = [(Route("qkv", 0, 3), lora), (Route("qkv", 3, 6), loha)]
    assert fused_lora(parts, 6) is None
    assert not FusedPatch(parts).host_native()
