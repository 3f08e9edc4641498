"""Merge mode keeps the scaled factors of recently used LoRAs: switching back must give the very same bits as
reading the file afresh (the general path), and what can change in place is never kept."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lora_compat import LoraFile, Patcher
from lora_compat.oracles.models import make_sd15_components
from lora_compat.patcher import factors as factors_module
from lora_compat.patcher.factors import FactorCache, scaled_factors
from lora_compat.patches.base import LowRank, Ref, Scale

import lora_pool as pool

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def lora_files():
    return pool.lora_files()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in model.items() for k, v in m.state_dict().items()}


def assert_identical(current: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert current.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(current[k], expected[k])]
    assert not different, f"{len(different)} parameters differ, e.g. {different[:3]}"


def fresh_with(checkpoint, entries) -> dict[str, torch.Tensor]:
    """The general path: a new Patcher (nothing kept) brings a copy of ``checkpoint`` to ``entries``."""
    fresh = copy.deepcopy(checkpoint)
    patcher = Patcher(fresh)
    patcher.set(entries)
    state = snapshot(fresh)
    patcher.close()
    return state


def counting_reads(monkeypatch) -> dict[str, int]:
    reads = {"n": 0}
    real = factors_module.scaled_factors

    def counted(low_rank, strength):
        reads["n"] += 1
        return real(low_rank, strength)

    monkeypatch.setattr(factors_module, "scaled_factors", counted)
    return reads


@pytest.mark.parametrize("dtype", DTYPES)
def test_switching_back_reuses_factors_bit_identically(lora_files, dtype, monkeypatch):
    checkpoint = make_sd15_components(dtype=dtype)
    model = copy.deepcopy(checkpoint)
    patcher = Patcher(model)
    reads = counting_reads(monkeypatch)
    stack = [(lora_files["lora"], 0.7), (lora_files["loha"], 0.5)]
    patcher.set(stack)
    first_reads = reads["n"]
    assert first_reads > 0
    patcher.set([(lora_files["lokr"], 1.0)])
    patcher.set(stack)  # back: the LoRA's factors come from the cache
    assert reads["n"] == first_reads
    monkeypatch.undo()
    assert_identical(snapshot(model), fresh_with(checkpoint, stack))
    patcher.set([(lora_files["lora"], 0.3)])  # another strength is another entry, computed afresh
    assert_identical(snapshot(model), fresh_with(checkpoint, [(lora_files["lora"], 0.3)]))
    patcher.close()


def test_in_memory_sources_are_read_afresh(lora_files):
    """Tensors in memory may be changed in place under the same identity: their factors are never kept."""
    checkpoint = make_sd15_components()
    model = copy.deepcopy(checkpoint)
    state = load_file(str(lora_files["lora"]))
    source = LoraFile.from_state_dict(state)
    patcher = Patcher(model)
    patcher.set([(source, 1.0)])
    assert patcher._backend.factors.bytes == 0
    for name in [k for k in state if k.endswith("lora_up.weight")]:
        state[name].mul_(2)
    patcher.set([(lora_files["lokr"], 1.0)])
    patcher.set([(source, 1.0)])
    expected = fresh_with(checkpoint, [(LoraFile.from_state_dict(state), 1.0)])
    assert_identical(snapshot(model), expected)
    assert any(not torch.equal(v, expected[k]) for k, v in fresh_with(checkpoint, [(lora_files["lora"], 1.0)]).items())
    patcher.close()


def _low_rank() -> tuple[LowRank, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(6, 4, generator=gen).half()
    down = torch.randn(4, 3, 1, 1, generator=gen).half()
    bias = torch.randn(6, generator=gen).half()
    return LowRank(Ref.of(up), Ref.of(down), Scale(2.0, 4), Ref.of(bias)), up, down, bias


def test_factors_are_scaled_once_in_fp32():
    low_rank, up, down, bias = _low_rank()
    got = FactorCache()(low_rank, 0.75)
    factor = 2.0 / 4 * 0.75
    assert torch.equal(got.up, up.float() * factor) and got.up.dtype == torch.float32
    assert torch.equal(got.down, down.float().reshape(4, 3))
    assert torch.equal(got.bias, bias.float() * factor)


def test_cache_hits_misses_and_budget():
    low_rank, *_ = _low_rank()
    cache = FactorCache()
    first = cache(low_rank, 1.0)
    assert cache(low_rank, 1.0) is first and cache.bytes == (6 * 4 + 4 * 3 + 6) * 4
    # the exact bits of the strength: -0.0 scales up to negative zeros
    negative = cache(low_rank, -0.0)
    assert torch.signbit(negative.up).all() and not torch.signbit(cache(low_rank, 0.0).up).any()
    empty = FactorCache(budget=0)
    kept_nothing = empty(low_rank, 1.0)
    assert empty.bytes == 0 and empty(low_rank, 1.0) is not kept_nothing
    reference = scaled_factors(low_rank, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(kept_nothing, reference))
