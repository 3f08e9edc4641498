"""The Patcher: exact reconciliation, the three field bugs, all-or-nothing, hot mode, threads."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat import Entry, LoraCompatError, LoraFile, Patcher

import lora_pool as pool
from lora_pool import KINDS
from lora_compat.oracles.models import make_sd15_components
from lora_compat.patcher import factors as factors_module
from lora_compat.patcher.factors import FactorCache, scaled_factors
from lora_compat.patches.base import LowRank, Ref, Scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def lora_files() -> dict[str, Path]:
    return pool.lora_files()


def snapshot(model: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in model.items() for k, v in m.state_dict().items()}


def assert_identical(model: dict[str, torch.nn.Module], expected: dict[str, torch.Tensor]) -> None:
    current = snapshot(model)
    assert current.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(current[k], expected[k])]
    assert not different, f"{len(different)} parameters differ, e.g. {different[:3]}"


def fresh_with(checkpoint: dict[str, torch.nn.Module], entries) -> dict[str, torch.Tensor]:
    """A fresh copy of ``checkpoint`` brought to ``entries`` in one set."""
    fresh = copy.deepcopy(checkpoint)
    patcher = Patcher(fresh)
    patcher.set(entries)
    state = snapshot(fresh)
    patcher.close()
    return state


# -- the three field bugs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_request_removes_everything(lora_files, dtype):
    model = make_sd15_components(dtype=dtype)
    pristine = snapshot(model)
    patcher = Patcher(model)
    patcher.set([(lora_files["lora"], 1.0), (lora_files["loha"], 0.7), (lora_files["norm"], 1.0)])
    assert patcher.active and snapshot(model).keys() == pristine.keys()
    report = patcher.set([])
    assert report.restored > 0 and patcher.active == []
    assert_identical(model, pristine)
    assert patcher.memory() == {"pristine_copies": 0, "buffers": 0}


@pytest.mark.parametrize("dtype", DTYPES)
def test_switching_checkpoints_never_writes_old_data_into_the_new_model(lora_files, dtype):
    model = make_sd15_components(seed=0, dtype=dtype)
    new_checkpoint = make_sd15_components(seed=7, dtype=dtype)
    patcher = Patcher(model)
    patcher.set([(lora_files["lora"], 1.0), (lora_files["diag_oft"], 0.5)])
    with pytest.warns(RuntimeWarning, match="adopted as the original"):
        for name, module in model.items():  # a host loads another checkpoint into the same modules
            module.load_state_dict(new_checkpoint[name].state_dict())
        patcher.set([(lora_files["loha"], 1.0)])
    assert_identical(model, fresh_with(new_checkpoint, [(lora_files["loha"], 1.0)]))
    patcher.clear()
    assert_identical(model, snapshot(new_checkpoint))


def test_a_replaced_component_object_is_patched_from_its_own_weights(lora_files):
    pipe = make_sd15_components(seed=0)
    old_unet = pipe["unet"]
    old_pristine = {k: v.clone() for k, v in old_unet.state_dict().items()}
    patcher = Patcher(pipe)
    patcher.set([(lora_files["lora"], 1.0)])
    pipe["unet"] = make_sd15_components(seed=9)["unet"]  # pipe.unet = another checkpoint's UNet
    new_pristine = {k: v.clone() for k, v in pipe["unet"].state_dict().items()}
    expected = fresh_with({"unet": copy.deepcopy(pipe["unet"]), "text_encoder": copy.deepcopy(pipe["text_encoder"])},
                          [(lora_files["lora"], 1.0)])
    patcher.set([(lora_files["lora"], 1.0)])
    # the new UNet got the LoRA on its own weights; the old one was put back as it was
    assert all(torch.equal(v, expected[f"unet.{k}"]) for k, v in pipe["unet"].state_dict().items())
    assert all(torch.equal(v, old_pristine[k]) for k, v in old_unet.state_dict().items())
    patcher.clear()
    assert all(torch.equal(v, new_pristine[k]) for k, v in pipe["unet"].state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_1000_apply_remove_cycles_leave_weights_bit_identical(tmp_path, dtype):
    model = make_sd15_components(dtype=dtype)
    unet = model["unet"]
    pristine = snapshot(model)
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for path, module in unet.named_modules():
        if path.endswith(("attn1.to_q", "ff.net.2", "proj_out")) and "mid_block" in path or path.endswith("attn2.to_v"):
            shape = module.weight.shape
            key = "lora_unet_" + path.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, *shape[1:], generator=gen)
            tensors[f"{key}.lora_up.weight"] = torch.randn(shape[0], 4, *([1] * (len(shape) - 2)), generator=gen)
            tensors[f"{key}.alpha"] = torch.tensor(2.0)
    lora = tmp_path / "cycle.safetensors"
    save_file(tensors, str(lora))
    patcher = Patcher(model)
    patcher.set([(lora, 0.8)])
    applied = snapshot(model)
    assert not all(torch.equal(applied[k], pristine[k]) for k in pristine)
    for _ in range(1000):
        patcher.set([])
        patcher.set([(lora, 0.8)])
    assert_identical(model, applied)
    patcher.clear()
    assert_identical(model, pristine)


# -- reconciliation details ------------------------------------------------------------------------------
def test_history_never_matters_and_order_is_canonical(lora_files):
    model = make_sd15_components()
    checkpoint = copy.deepcopy(model)
    patcher = Patcher(model)
    patcher.set([(lora_files["lora"], 1.0)])
    patcher.set([(lora_files["loha"], 0.3), (lora_files["boft"], 1.0)])
    report = patcher.set([(lora_files["boft"], 1.0), (lora_files["loha"], 0.3)])
    assert report.recomputed == 0 and report.restored == 0  # a reorder changes nothing
    assert_identical(model, fresh_with(checkpoint, [(lora_files["loha"], 0.3), (lora_files["boft"], 1.0)]))


def test_only_changed_modules_are_recomputed(lora_files):
    model = make_sd15_components()
    patcher = Patcher(model)
    first = patcher.set([(lora_files["lora"], 1.0), (lora_files["ia3"], 1.0)])
    again = patcher.set([(lora_files["lora"], 1.0), (lora_files["ia3"], 1.0)])
    assert first.recomputed == first.targets > 0
    assert (again.recomputed, again.restored) == (0, 0)
    weaker = patcher.set([(lora_files["lora"], 1.0), (lora_files["ia3"], 0.5)])
    ia3_targets = len(lora_compat.read(lora_files["ia3"]))
    assert weaker.recomputed == ia3_targets


def test_parameter_objects_stay_the_same(lora_files):
    model = make_sd15_components()
    before = {f"{c}.{k}": p for c, m in model.items() for k, p in m.named_parameters()}
    patcher = Patcher(model)
    patcher.set([(lora_files["lora"], 1.0), (lora_files["full"], 1.0)])
    patcher.clear()
    after = {f"{c}.{k}": p for c, m in model.items() for k, p in m.named_parameters()}
    assert all(before[k] is after[k] for k in before)


def test_merge_mode_writes_what_patched_weights_computes(lora_files):
    model = make_sd15_components(dtype=torch.float16)
    expected = lora_compat.patched_weights(lora_files["dora_out"], model, strength=0.6)
    patcher = Patcher(model)
    patcher.set([(lora_files["dora_out"], 0.6)])
    state = snapshot(model)
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_applied_context_restores_on_exceptions(lora_files):
    model = make_sd15_components()
    pristine = snapshot(model)
    patcher = Patcher(model)
    with pytest.raises(ZeroDivisionError):
        with patcher.applied([(lora_files["glora"], 1.0)]):
            assert patcher.active[0].source == lora_files["glora"]
            1 / 0
    assert patcher.active == []
    assert_identical(model, pristine)


def test_component_filters_and_entry_objects(lora_files):
    model = make_sd15_components()
    checkpoint = copy.deepcopy(model)
    patcher = Patcher(model)
    patcher.set([Entry(lora_files["lora"], 0.8, components={"unet"})])
    state = snapshot(model)
    assert all(torch.equal(state[k], v) for k, v in snapshot(checkpoint).items() if k.startswith("text_encoder."))
    patcher.set([Entry(lora_files["lora"], 1.0, components={"unet": 0.8, "text_encoder": 0.5})])
    expected_unet = lora_compat.patched_weights(lora_files["lora"], {"unet": checkpoint["unet"]}, strength=0.8)
    state = snapshot(model)
    assert all(torch.equal(state[k], v) for k, v in expected_unet.items())


# -- all or nothing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_set_that_fails_midway_leaves_every_parameter_as_before(lora_files, dtype):
    model = make_sd15_components(dtype=dtype)
    patcher = Patcher(model)
    patcher.set([(lora_files["lora"], 1.0), (lora_files["loha"], 0.5)])
    before, active = snapshot(model), patcher.active
    broken = pool.breaking_file(lora_files["lokr"], fail_on=200)
    with pytest.raises(lora_compat.CorruptFileError, match="truncated"):
        patcher.set([(lora_files["lora"], 0.3), (broken, 1.0)])
    assert_identical(model, before)
    assert patcher.active == active
    patcher.set([(lora_files["lora"], 0.3)])  # and it keeps working afterwards
    assert_identical(model, fresh_with(make_sd15_components(dtype=dtype), [(lora_files["lora"], 0.3)]))


def test_out_of_memory_midway_is_rolled_back_and_named(lora_files, monkeypatch):
    from lora_compat.patcher import merge_backend

    model = make_sd15_components()
    patcher = Patcher(model)
    patcher.set([(lora_files["lora"], 1.0)])
    before = snapshot(model)
    calls = {"n": 0}
    real = merge_backend.merged_values

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 50:
            raise MemoryError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_backend, "merged_values", flaky)
    with pytest.raises(LoraCompatError, match=r"applying .*full.* failed at unet\..*MemoryError"):
        patcher.set([(lora_files["full"], 1.0)])
    monkeypatch.undo()
    assert_identical(model, before)


def test_bad_file_fails_before_anything_is_touched(lora_files, tmp_path):
    model = make_sd15_components()
    patcher = Patcher(model)
    patcher.set([(lora_files["lora"], 1.0)])
    before = snapshot(model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(lora_compat.CorruptFileError, match="bad.safetensors"):
        patcher.set([(lora_files["lora"], 1.0), (bad, 1.0)])
    assert_identical(model, before)


# -- hot mode ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS + ["peft_dora"])
def test_hot_mode_matches_merge_mode_on_a_unet_forward(lora_files, kind):
    merged_model = make_sd15_components()
    hot_model = copy.deepcopy(merged_model)
    pristine = snapshot(hot_model)
    Patcher(merged_model).set([(lora_files[kind], 0.8)])
    hot = Patcher(hot_model, mode="hot")
    hot.set([(lora_files[kind], 0.8)])
    assert_identical(hot_model, pristine)  # hot mode never writes weights
    gen = torch.Generator().manual_seed(0)
    sample, states = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)
    with torch.no_grad():
        expected = merged_model["unet"](sample, 3, encoder_hidden_states=states).sample
        got = hot_model["unet"](sample, 3, encoder_hidden_states=states).sample
        tokens = torch.tensor([[0, 5, 9, 2]])
        expected_te = merged_model["text_encoder"](tokens).last_hidden_state
        got_te = hot_model["text_encoder"](tokens).last_hidden_state
    assert ((got - expected).norm() / expected.norm()) < 1e-5
    assert ((got_te - expected_te).norm() / expected_te.norm()) < 1e-5
    hot.clear()
    with torch.no_grad():
        plain = hot_model["unet"](sample, 3, encoder_hidden_states=states).sample
    assert not torch.allclose(plain, expected)


# -- ownership and threads -----------------------------------------------------------------------------------
def test_a_target_is_owned_by_one_patcher_at_a_time():
    model = make_sd15_components()
    first = Patcher(model)
    with pytest.raises(LoraCompatError, match="already owned by another Patcher"):
        Patcher({"unet": model["unet"]})
    first.close()
    Patcher({"unet": model["unet"]}).close()


def test_concurrent_sets_serialise(lora_files):
    model = make_sd15_components()
    checkpoint = copy.deepcopy(model)
    patcher = Patcher(model)
    stacks = [[(lora_files["lora"], 1.0)], [(lora_files["loha"], 0.5), (lora_files["ia3"], 1.0)], []]
    errors = []

    def worker(seed: int) -> None:
        try:
            for i in range(6):
                patcher.set(stacks[(seed + i) % len(stacks)])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = [(e.source, e.strength) for e in patcher.active]
    assert_identical(model, fresh_with(checkpoint, final))


# -- merge mode keeps the scaled factors of recently used LoRAs: the same bits as reading afresh ------------------
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
    assert_identical(model, fresh_with(checkpoint, stack))
    patcher.set([(lora_files["lora"], 0.3)])  # another strength is another entry, computed afresh
    assert_identical(model, fresh_with(checkpoint, [(lora_files["lora"], 0.3)]))
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
    assert_identical(model, expected)
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
    # the exact bits of the strength: -0.0 and 0.0 scale ``up`` to zeros of opposite signs
    negative, positive = cache(low_rank, -0.0), cache(low_rank, 0.0)
    assert negative is not positive
    assert torch.equal(torch.signbit(negative.up), ~torch.signbit(positive.up))
    empty = FactorCache(budget=0)
    kept_nothing = empty(low_rank, 1.0)
    assert empty.bytes == 0 and empty(low_rank, 1.0) is not kept_nothing
    reference = scaled_factors(low_rank, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(kept_nothing, reference))
