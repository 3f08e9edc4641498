"""Every dialect that writes, on every registered base: a rank-1 LoRA on every module of the base's full-size table,
written through the dialect and read back by detection, comes back on the same targets with exactly the deltas that
were written (the read and write name tables are inverses). A dialect that reads only says so."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lora_compat
from lora_compat import LoraCompatError, plugins
from lora_compat.tools.convert import convert_state_dict, save
from lora_compat.dialects import Dialect
from lora_compat.dialects.writing import Written
from lora_compat.hooks import hookimpl
from lora_compat.patches import LoraPatch, Ref
from lora_compat.patchset import PatchSet

WRITERS = [(d.id, target) for d in plugins.dialects().values() for target in d.writes]
BASES = list(plugins.archs())
#: one PEFT adapter holds one model: its cases write each component on its own
CASES = [pytest.param(dialect, target, base, id=f"{target}-{base}") for dialect, target in WRITERS for base in BASES
         if plugins.dialects()[dialect].bases is None or base in plugins.dialects()[dialect].bases]


def small_integers(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Non-zero integers in [-3, 3]: every product and sum below is exact in fp32 and fp64."""
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    return (sign * torch.randint(1, 4, shape, generator=generator)).float()


def rank_one_loras(base: str, components: list[str]) -> tuple[PatchSet, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A rank-1 LoRA (alpha = rank: scale 1) on every module of ``components`` whose weight a LoRA can change
    (2-D or 4-D), and the factors ``(up [out, 1], down [1, in·k·k])`` of each delta."""
    index = plugins.archs()[base].index
    generator = torch.Generator().manual_seed(len(base))
    patches, factors = {}, {}
    for component in components:
        for path, params in index.components[component].items():
            weight = params.get("weight")
            if weight is None or len(weight) not in (2, 4):
                continue  # norms and biases: no LoRA has their shape
            target = f"{component}.{path}"
            down = small_integers((1, *weight[1:]), generator)
            up = small_integers((weight[0], 1, *(1 for _ in weight[2:])), generator)
            patches[target] = LoraPatch(Ref.of(up, f"{target}.up"), Ref.of(down, f"{target}.down"))
            factors[target] = (up.reshape(weight[0], 1), down.reshape(1, -1))
    return PatchSet(patches, source=f"{base} rank-1", base=base), factors


def assert_same_delta(patch, up: torch.Tensor, down: torch.Tensor, target: str) -> None:
    """The patch's delta is exactly ``up @ down``. ``‖s·U·D − up·down‖² = tr((AᵀA)(BBᵀ))`` with ``A = [s·U, −up]``,
    ``B = [D; down]``: computed without the out×in matrix (full-size FLUX.1 has 12B weights), and exactly, since
    the entries are small integers in float64. Small modules are also compared element by element."""
    low_rank = patch.low_rank()
    assert low_rank is not None, (target, patch.kind)
    read_up, read_down, scale = low_rank.factors()
    assert (read_up.shape[0], read_down.shape[1]) == (up.shape[0], down.shape[1]), target
    a = torch.cat([read_up.double() * scale, -up.double()], dim=1)
    b = torch.cat([read_down.double(), down.double()], dim=0)
    assert float(((a.T @ a) * (b @ b.T)).sum()) == 0.0, target
    if up.shape[0] * down.shape[1] <= 1 << 16:
        assert torch.equal((read_up * scale) @ read_down, up @ down), target


def write_and_detect(dialect: str, target: str, base: str, patchset: PatchSet, out: Path):
    """The written file as detection reads it. A file whose modules several bases have (one CLIP-L text encoder
    alone: SD1.5's, SDXL's and FLUX.1's) names no base; it is read against ``base``, one of its candidates."""
    written = plugins.dialects()[dialect].write(patchset, plugins.archs()[base].index, target=target, base=base)
    assert isinstance(written, Written) and 0 < written.modules <= len(patchset)  # fused modules count once
    path = save(written.tensors, dict(written.metadata), target, out)
    detection = lora_compat.detect(path)
    if detection.base is None:
        assert base in detection.base_candidates and len(detection.base_candidates) > 1
        detection = lora_compat.detect(path, base)
    return detection


@pytest.mark.parametrize("dialect, target, base", CASES)
def test_every_module_reads_back_as_written(tmp_path: Path, dialect: str, target: str, base: str) -> None:
    components = list(plugins.archs()[base].index.components)
    # a PEFT adapter holds one model: each component is its own file
    groups = [[c] for c in components] if target == "peft" else [components]
    for group in groups:
        patchset, factors = rank_one_loras(base, group)
        detection = write_and_detect(dialect, target, base, patchset, tmp_path / f"{'-'.join(group)}.safetensors")
        assert (detection.dialect.id, detection.base) == (dialect, base)
        back = detection.patchset
        assert back.unmatched == {} and back.misfits == {}
        assert sorted(back) == sorted(factors)
        for name, (up, down) in factors.items():
            assert back[name].kind == "lora", name
            assert_same_delta(back[name], up, down, name)


def test_a_dialect_that_reads_only_says_so() -> None:
    lycoris = plugins.dialects()["lycoris"]
    assert lycoris.writes == ()
    patchset, _ = rank_one_loras("sd15", [])
    with pytest.raises(LoraCompatError, match=re.escape("the lycoris dialect reads only; convert writes the targets "
                                                        "kohya, webui, diffusers, peft, bfl")):
        lycoris.write(patchset, plugins.archs()["sd15"].index)
    with pytest.raises(LoraCompatError, match=re.escape("the kohya dialect writes kohya, webui, not 'bfl'")):
        plugins.dialects()["kohya"].write(patchset, plugins.archs()["sd15"].index, target="bfl")


class _Upper(Dialect):
    """A third-party dialect that reads nothing and writes ``upper``: kohya's names, upper-cased."""

    id = "upper-test"
    writes = ("upper",)

    def detect(self, header):
        return None

    def read(self, file, index):
        raise AssertionError("never read")

    def write(self, patchset, index, *, target=None, base=None, rank=None, weights=None) -> Written:
        written = plugins.dialects()["kohya"].write(patchset, index, target="webui", base=base)
        written.tensors = {k.upper(): v for k, v in written.tensors.items()}
        return written


class _UpperPlugin:
    @hookimpl
    def register_dialects(self, register) -> None:
        register(_Upper())


def test_a_plugin_dialect_that_writes_adds_a_convert_target(tmp_path: Path) -> None:
    patchset, factors = rank_one_loras("sd15", ["text_encoder"])
    written = plugins.dialects()["kohya"].write(patchset, plugins.archs()["sd15"].index, target="webui", base="sd15")
    source = save(written.tensors, dict(written.metadata), "webui", tmp_path / "source.safetensors")
    with pytest.raises(LoraCompatError, match="unknown target dialect 'upper'"):
        convert_state_dict(source, "upper")
    plugins.register_plugin(_UpperPlugin(), name="upper-test-plugin")
    try:
        tensors, _, report = convert_state_dict(source, "upper")
    finally:
        plugins.unregister_plugin(plugins.get_plugin_manager().get_plugin("upper-test-plugin"))
    assert report.modules == len(factors) and report.tensors == len(tensors)
    assert sorted(tensors) == sorted(k.upper() for k in written.tensors)
