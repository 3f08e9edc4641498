"""Property-based: random sequences of set / clear / strength change / reorder / checkpoint reload / failing
set on a tiny SD1.5 UNet + CLIP in fp32, fp16 and bf16. After every step every parameter is bit-identical
to a fresh copy of the current checkpoint brought to the same stack in one ``set``."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import lora_compat
from lora_compat import Patcher

import lora_pool as pool
from lora_compat.oracles.models import make_sd15_components

NAMES = sorted(pool.KINDS + ["peft_dora"])
STRENGTHS = st.sampled_from([1.0, 0.5, 0.25, -0.7, 1.3, 0.0])
STACKS = st.lists(st.tuples(st.sampled_from(NAMES), STRENGTHS), max_size=3)


def state_of(model: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in model.items() for k, v in m.state_dict().items()}


class PatcherMachine(RuleBasedStateMachine):
    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.files = pool.lora_files()
        self.model = make_sd15_components(seed=0, dtype=self.dtype)
        self.checkpoint = state_of(self.model)
        self.pristine = self.checkpoint
        self.patcher = Patcher(self.model)
        self.stack: list[tuple[str, float]] = []

    def entries(self, stack: list[tuple[str, float]]) -> list[tuple]:
        return [(self.files[name], strength) for name, strength in stack]

    def apply(self, stack: list[tuple[str, float]]) -> None:
        self.patcher.set(self.entries(stack))
        self.stack = list(stack)

    @rule(stack=STACKS)
    def set_stack(self, stack):
        self.apply(stack)

    @rule()
    def clear(self):
        self.patcher.clear()
        self.stack = []
        assert state_of(self.model).keys() == self.checkpoint.keys()
        assert all(torch.equal(v, self.checkpoint[k]) for k, v in state_of(self.model).items())

    @precondition(lambda self: self.stack)
    @rule(data=st.data(), strength=STRENGTHS)
    def change_strength(self, data, strength):
        i = data.draw(st.integers(0, len(self.stack) - 1))
        stack = list(self.stack)
        stack[i] = (stack[i][0], strength)
        self.apply(stack)

    @precondition(lambda self: len(self.stack) >= 2)
    @rule(data=st.data())
    def reorder(self, data):
        self.apply(data.draw(st.permutations(self.stack)))

    @rule(seed=st.integers(1, 3))
    def reload_checkpoint(self, seed):
        """A host loads another checkpoint into the same modules behind the patcher's back."""
        other = make_sd15_components(seed=seed, dtype=self.dtype)
        for name, module in self.model.items():
            module.load_state_dict(other[name].state_dict())
        self.checkpoint = state_of(other)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            self.patcher.set(self.entries(self.stack))

    @rule(stack=STACKS, broken=st.sampled_from(NAMES), fail_on=st.integers(1, 400))
    def failing_set(self, stack, broken, fail_on):
        before = state_of(self.model)
        entries = self.entries(stack) + [(pool.breaking_file(self.files[broken], fail_on), 1.0)]
        try:
            self.patcher.set(entries)
        except lora_compat.LoraCompatError:
            after = state_of(self.model)
            assert all(torch.equal(v, before[k]) for k, v in after.items())
        else:  # it would have broken after its last read: the set went through; name it by its path again
            self.apply(list(stack) + [(broken, 1.0)])

    @invariant()
    def equals_a_fresh_model_brought_to_the_stack_in_one_set(self):
        fresh = make_sd15_components(seed=0, dtype=self.dtype)
        for name, module in fresh.items():
            module.load_state_dict({k[len(name) + 1:]: v for k, v in self.checkpoint.items()
                                    if k.startswith(name + ".")})
        patcher = Patcher(fresh)
        patcher.set(self.entries(self.stack))
        expected = state_of(fresh)
        patcher.close()
        current = state_of(self.model)
        different = [k for k in expected if not torch.equal(current[k], expected[k])]
        assert not different, f"{len(different)} parameters differ after {self.stack}: {different[:3]}"

    def teardown(self):
        self.patcher.close()


SETTINGS = settings(max_examples=6, stateful_step_count=6, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_patcher_state_machine(dtype):
    machine = type(f"PatcherMachine_{str(dtype).split('.')[-1]}", (PatcherMachine,), {"dtype": dtype})
    pool.lora_files()  # write the pool once, outside hypothesis' timing
    from hypothesis.stateful import run_state_machine_as_test

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_compat.LoraCompatWarning)
        run_state_machine_as_test(machine, settings=SETTINGS)
