"""Start/stop step fractions in hot mode: a diffusers pipeline run with ``patcher.step_callback()`` applies
each LoRA exactly in its fraction of the steps (every UNet call equals the UNet with just the LoRAs that
should run at that step), the clock goes back to step 0 after a run, and merge mode refuses."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import lora_compat
from lora_compat import Entry, LoraCompatError, Patcher

from lora_pool import lora_files
from lora_compat.oracles.models import make_sd15_components, tiny_sd15_pipeline, tiny_tokenizer

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)


def _run(pipe, steps: int, callback=None) -> torch.Tensor:
    return pipe("a cat in snow", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), height=16,
                width=16, output_type="pt", guidance_scale=3.0, callback_on_step_end=callback).images


def _record_unet(unet: torch.nn.Module) -> tuple[list, object]:
    calls = []

    def record(module, args, kwargs, output) -> None:
        clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        calls.append(([clone(a) for a in args], {k: clone(v) for k, v in kwargs.items()}, output[0].clone()))

    return calls, unet.register_forward_hook(record, with_kwargs=True)


def test_each_lora_runs_exactly_in_its_fraction_of_the_steps(tmp_path: Path) -> None:
    files = lora_files()
    components = make_sd15_components(seed=100)
    pipe = tiny_sd15_pipeline(components, tiny_tokenizer(tmp_path))
    patcher = Patcher(pipe, mode="hot")
    early = Entry(files["lora"], 0.8, stop=0.5)         # low-rank path
    late = Entry(files["loha"], 1.0, start=0.5)         # materialised-delta path
    middle = Entry(files["lokr"], 0.6, start=0.25, stop=0.75)
    patcher.set([early, late, middle])
    calls, handle = _record_unet(components["unet"])
    scheduled = _run(pipe, 4, patcher.step_callback())
    handle.remove()
    assert len(calls) == 4
    running = [[early], [early, middle], [late, middle], [late]]  # steps at 0, 1/4, 2/4, 3/4 of the run
    for (args, kwargs, output), entries in zip(calls, running):
        patcher.set([Entry(e.source, e.strength) for e in entries])
        with torch.no_grad():
            assert torch.equal(components["unet"](*args, **kwargs)[0], output)
    patcher.set([early, late, middle])
    assert torch.equal(_run(pipe, 4, patcher.step_callback()), scheduled)  # the clock went back to step 0
    patcher.set([Entry(early.source, early.strength), Entry(late.source, late.strength)])
    assert not torch.equal(_run(pipe, 4), scheduled)


def test_outside_a_run_the_clock_is_at_step_zero(tmp_path: Path) -> None:
    files = lora_files()
    components = make_sd15_components(seed=100)
    pipe = tiny_sd15_pipeline(components, tiny_tokenizer(tmp_path))
    base = _run(pipe, 2)
    patcher = Patcher(pipe, mode="hot")
    patcher.set([Entry(files["lora"], 1.0, start=0.5)])
    assert torch.equal(_run(pipe, 2), base)  # no callback: the LoRA never reaches its start
    assert not torch.equal(_run(pipe, 2, patcher.step_callback()), base)
    patcher.set([Entry(files["lora"], 1.0, start=0.0, stop=1.0)])
    assert not torch.equal(_run(pipe, 2), base)


def test_the_callback_reads_the_step_count_from_the_pipeline_or_its_argument() -> None:
    components = make_sd15_components(seed=100)
    patcher = Patcher(components, mode="hot")
    clock = patcher._backend.clock
    kwargs = {"latents": torch.zeros(1)}

    class Pipe:
        num_timesteps = 8

    callback = patcher.step_callback()
    assert callback(Pipe(), 1, None, kwargs) is kwargs and clock.fraction == 0.25
    assert callback(Pipe(), 7, None, kwargs) is kwargs and clock.fraction == 0.0
    counted = patcher.step_callback(num_steps=5)
    counted(object(), 2, None, kwargs)
    assert clock.fraction == 0.6
    with pytest.raises(LoraCompatError, match=r"cannot tell the number of steps.*step_callback\(num_steps=N\)"):
        patcher.step_callback()(object(), 0, None, kwargs)


def test_merge_mode_refuses_step_fractions_and_changes_nothing() -> None:
    files = lora_files()
    components = make_sd15_components(seed=100)
    before = {n: p.clone() for n, p in components["unet"].named_parameters()}
    patcher = Patcher(components)
    with pytest.raises(LoraCompatError, match=r"lora.*: start/stop step fractions .* needs Patcher\(mode='hot'\)"):
        patcher.set([(files["loha"], 1.0), Entry(files["lora"], 1.0, stop=0.5)])
    assert patcher.active == []
    assert all(torch.equal(p, before[n]) for n, p in components["unet"].named_parameters())
    with pytest.raises(LoraCompatError, match=r"step fractions need Patcher\(mode='hot'\)"):
        patcher.step_callback()


@pytest.mark.parametrize("start, stop", [(0.5, 0.5), (0.7, 0.2), (-0.1, 1.0), (0.0, 1.5)])
def test_invalid_fractions_are_refused(start: float, stop: float) -> None:
    with pytest.raises(ValueError, match=r"lora\.safetensors: start/stop must satisfy 0 <= start < stop <= 1"):
        Entry("lora.safetensors", 1.0, start=start, stop=stop)
