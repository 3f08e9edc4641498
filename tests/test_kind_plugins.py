"""A third-party patch kind: one module registered through ``register_kinds`` (at run time and through an entry
point) is recognised by its key suffixes, read, applied exactly and reported, with no edit to lora_compat."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from plugin_dist import install_plugin
import lora_compat
from lora_compat import plugins
from lora_compat.hooks import hookimpl
from lora_compat.patches import LoraPatch
from lora_compat.patches.build import IncompletePatch, build_patch, split_key

#: a made-up kind: ΔW = tri_u · diag(tri_m) · tri_v (a LoRA with a learned per-rank gain), scale 1
KIND_SOURCE = '''
"""TriLoRA: a LoRA with a learned gain per rank (made up for the tests; the README's example kind)."""
from lora_compat.hooks import hookimpl
from lora_compat.patches import FactorisedPatch
from lora_compat.patches.base import IncompletePatch, conv_or_linear_misfit


class TriPatch(FactorisedPatch):
    kind = "tri"
    suffixes = {"tri_u": "tri_u", "tri_m": "tri_m", "tri_v": "tri_v"}
    min_dims = {"tri_u": 2, "tri_m": 1, "tri_v": 2}

    @classmethod
    def from_parts(cls, parts, context):
        if not parts.keys() & {"tri_u", "tri_m", "tri_v"}:
            return None
        if not {"tri_u", "tri_m", "tri_v"} <= parts.keys():
            raise IncompletePatch("TriLoRA needs tri_u, tri_m and tri_v")
        return cls(parts["tri_u"], parts["tri_m"], parts["tri_v"])

    def __init__(self, u, m, v):
        self.u, self.m, self.v = u, m, v

    def refs(self):
        return {"tri_u": self.u, "tri_m": self.m, "tri_v": self.v}

    def misfit(self, shapes):
        return conv_or_linear_misfit(shapes.get("weight"), self.u.shape[0], self.v.shape[1], "TriLoRA")

    def weight_delta(self, weight_shape):
        return ((self.u.load() * self.m.load()) @ self.v.load()).reshape(weight_shape)

    def to_tensors(self):
        return {"tri_u": self.u.loader(), "tri_m": self.m.loader(), "tri_v": self.v.loader()}


@hookimpl
def register_kinds(register):
    register(TriPatch)
'''

TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def tri_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"tri_u": torch.randn(8, 3, generator=gen), "tri_m": torch.randn(3, generator=gen),
            "tri_v": torch.randn(3, 8, generator=gen)}


def write_tri_file(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({f"{KOHYA_TO_Q}.{suffix}": t.contiguous() for suffix, t in tensors.items()}, str(path))
    return path


def expected_weight(weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``W + u·diag(m)·v`` in float64, from the raw tensors (not through the kind)."""
    delta = tensors["tri_u"].double() @ torch.diag(tensors["tri_m"].double()) @ tensors["tri_v"].double()
    return (weight.double() + delta).float()


@pytest.fixture
def tri_plugin(tmp_path, monkeypatch):
    (tmp_path / "tri_kind.py").write_text(KIND_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tri_kind

    plugins.register_plugin(tri_kind, name="tri-plugin")
    try:
        yield tri_kind
    finally:
        plugins.unregister_plugin(tri_kind)


def test_builtin_kinds_register_through_the_hook():
    kinds = plugins.registry().kinds
    assert list(kinds) == ["lora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "norm", "set", "dora",
                           "peft_oft", "peft_boft", "peft_ia3"]
    assert {r.plugin for r in kinds.values()} == {"builtin"}
    assert kinds["lora"].obj is LoraPatch


def test_module_plugin_adds_a_kind_that_is_read_applied_and_reported(tmp_path, tri_plugin):
    from lora_compat.oracles.models import make_sd15_components

    assert plugins.registry().kinds["tri"].plugin == "tri-plugin"
    assert split_key(f"{KOHYA_TO_Q}.tri_m", False) == (KOHYA_TO_Q, "tri_m")
    assert split_key(f"unet.{TO_Q[5:]}.tri_u", True) == (f"unet.{TO_Q[5:]}", "tri_u")
    tensors = tri_tensors()
    path = write_tri_file(tmp_path / "tri.safetensors", tensors)

    info = lora_compat.inspect(path)
    assert (info.dialect, info.kinds, info.targets, info.unmatched) == ("lycoris", ["tri"], 1, [])
    patchset = lora_compat.read(path)
    assert list(patchset) == [TO_Q] and patchset[TO_Q].kind == "tri"

    components = make_sd15_components()
    weight = components["unet"].get_submodule(TO_Q[5:]).weight.detach().clone()
    new = lora_compat.patched_weights(path, components)
    torch.testing.assert_close(new[f"{TO_Q}.weight"], expected_weight(weight, tensors), rtol=1e-6, atol=1e-6)
    half = lora_compat.patched_weights(path, components, strength=0.5)
    delta = tensors["tri_u"].double() @ torch.diag(tensors["tri_m"].double()) @ tensors["tri_v"].double()
    torch.testing.assert_close(half[f"{TO_Q}.weight"], (weight.double() + 0.5 * delta).float(), rtol=1e-6, atol=1e-6)


def test_a_plugin_kind_writes_its_own_tensors_back(tmp_path, tri_plugin):
    """``convert --to kohya`` writes the kind's tensors (its ``to_tensors``) under host names, as stored."""
    tensors = tri_tensors(3)
    path = write_tri_file(tmp_path / "tri.safetensors", tensors)
    converted, _, _ = lora_compat.convert_state_dict(path, "kohya")
    assert set(converted) == {f"{KOHYA_TO_Q}.{suffix}" for suffix in tensors}
    for suffix, tensor in tensors.items():
        assert torch.equal(converted[f"{KOHYA_TO_Q}.{suffix}"], tensor)


def test_a_plugin_kind_is_wrapped_by_dora_and_its_messages_are_kept(tmp_path, tri_plugin):
    """The DoRA kind wraps any factorised kind, a plugin's too; the kind's own IncompletePatch message is the
    module's unmatched reason."""
    from lora_compat.patches.base import Ref

    tensors = tri_tensors(1)
    parts = {role: Ref.of(t, role) for role, t in tensors.items()}
    magnitude = torch.rand(8) + 0.5
    patch = build_patch({**parts, "dora_scale": Ref.of(magnitude.reshape(8, 1), "dora_scale")})
    assert patch.kinds == ("tri", "dora")
    weight = torch.randn(8, 8)
    merged = weight.double() + tensors["tri_u"].double() @ torch.diag(tensors["tri_m"].double()) \
        @ tensors["tri_v"].double()
    dora = magnitude.double().reshape(8, 1) * merged / (merged.norm(dim=1, keepdim=True) + 2.0 ** -23)
    torch.testing.assert_close(weight + patch.delta({"weight": weight})["weight"], dora.float(), rtol=1e-5, atol=1e-5)

    with pytest.raises(IncompletePatch, match="TriLoRA needs tri_u, tri_m and tri_v"):
        build_patch({"tri_u": parts["tri_u"], "tri_m": parts["tri_m"]})
    save_file({f"{KOHYA_TO_Q}.tri_u": tensors["tri_u"], f"{KOHYA_TO_Q}.tri_m": tensors["tri_m"]},
              str(tmp_path / "broken.safetensors"))
    reasons = lora_compat.inspect(tmp_path / "broken.safetensors").unmatched_reasons
    assert reasons == {f"{KOHYA_TO_Q}.tri_{r}": f"module {KOHYA_TO_Q!r}: TriLoRA needs tri_u, tri_m and tri_v"
                       for r in "um"}


def test_a_kind_reading_a_suffix_as_another_role_is_refused():
    class Clash:
        @hookimpl
        def register_kinds(self, register):
            class Rogue(LoraPatch):
                kind = "rogue"
                suffixes = {"lora_up.weight": "down"}
            register(Rogue)

    clash = Clash()
    plugins.register_plugin(clash, name="clash")
    try:
        with pytest.raises(lora_compat.LoraCompatError,
                           match="kind 'rogue' reads suffix 'lora_up.weight' as role 'down', kind 'lora' as 'up'"):
            plugins.registry()
    finally:
        plugins.unregister_plugin(clash)


def test_duplicate_kind_id_and_non_kinds_are_refused():
    class Twice:
        @hookimpl
        def register_kinds(self, register):
            register(LoraPatch)

    class NotAKind:
        @hookimpl
        def register_kinds(self, register):
            register(LoraPatch(None, None))  # an instance, not the class

    for plugin, message in ((Twice(), "registers kind id 'lora', already provided by 'builtin'"),
                            (NotAKind(), "expected a Patch subclass with its own `kind` id")):
        plugins.register_plugin(plugin, name="bad")
        try:
            with pytest.raises(lora_compat.LoraCompatError, match=message):
                plugins.registry()
        finally:
            plugins.unregister_plugin(plugin)


def test_entry_point_kind_is_discovered(tmp_path):
    """A tiny distribution with a ``lora_compat`` entry point holding the kind, installed into a target dir: the
    CLI lists the kind with its plugin, ``inspect`` reports it, and it applies exactly."""
    env = install_plugin(tmp_path, "tri_lora", KIND_SOURCE, "tri")
    tensors = tri_tensors(2)
    lora = write_tri_file(tmp_path / "tri.safetensors", tensors)
    cli = [sys.executable, "-m", "lora_compat"]

    listed = json.loads(subprocess.run(cli + ["dialects", "--json"], env=env, check=True,
                                       capture_output=True, text=True).stdout)
    assert {"id": "tri", "plugin": "tri", "description": "TriLoRA: a LoRA with a learned gain per rank (made up for "
            "the tests; the README's example kind)."} in listed["kinds"]
    text = subprocess.run(cli + ["dialects"], env=env, check=True, capture_output=True, text=True).stdout
    assert "tri" in text.split("patch kinds:")[1]
    inspected = json.loads(subprocess.run(cli + ["inspect", "--json", str(lora)], env=env, check=True,
                                          capture_output=True, text=True).stdout)
    assert (inspected["dialect"], inspected["kinds"], inspected["targets"]) == ("lycoris", ["tri"], 1)

    weights = tmp_path / "weights.safetensors"
    script = textwrap.dedent(f"""
        import sys
        from safetensors.torch import save_file
        import lora_compat
        from lora_compat.oracles.models import make_sd15_components
        components = make_sd15_components()
        new = lora_compat.patched_weights(sys.argv[1], components)
        save_file({{"weight": new["{TO_Q}.weight"].contiguous()}}, sys.argv[2])
    """)
    subprocess.run([sys.executable, "-c", script, str(lora), str(weights)], env=env, check=True, capture_output=True)
    from safetensors.torch import load_file

    from lora_compat.oracles.models import make_sd15_components

    weight = make_sd15_components()["unet"].get_submodule(TO_Q[5:]).weight.detach()
    torch.testing.assert_close(load_file(str(weights))["weight"], expected_weight(weight, tensors),
                               rtol=1e-6, atol=1e-6)

    without = subprocess.run(cli + ["inspect", "--json", str(lora)], capture_output=True, text=True)
    assert without.returncode == 2
    assert "no registered dialect recognises these keys" in without.stderr


def test_low_rank_form_of_the_builtin_kinds():
    """One question replaces the hand-written "is this a plain LoRA" checks: a LoRA without Tucker mid has a
    low-rank form (its bias included), nothing else does; the DoRA of a PEFT file keeps its LoRA for PEFT."""
    from lora_compat.patches import DoraPatch, LohaPatch, Ref
    from lora_compat.patches.base import Scale

    up, down, mid, bias = (Ref.of(t, n) for t, n in ((torch.randn(6, 2), "up"), (torch.randn(2, 4), "down"),
                                                     (torch.randn(2, 2, 3, 3), "mid"), (torch.randn(6), "bias")))
    alpha = Ref.of(torch.tensor(4.0), "alpha")
    plain = LoraPatch(up, down, Scale(alpha, 2), bias=bias)
    low_rank = plain.low_rank()
    assert (low_rank.up, low_rank.down, low_rank.bias, low_rank.rank) == (up, down, bias, 2)
    factors = low_rank.factors()
    assert torch.equal(factors[0], up.load()) and torch.equal(factors[1], down.load()) and factors[2] == 2.0
    assert LoraPatch(up, Ref.of(torch.randn(2, 4, 1, 1), "down"), mid=mid).low_rank() is None
    loha = LohaPatch(*(Ref.of(torch.randn(*s), "w") for s in ((6, 2), (2, 4), (6, 2), (2, 4))))
    assert loha.low_rank() is None and loha.peft_lora() is None
    magnitude = Ref.of(torch.rand(6), "magnitude")
    assert plain.peft_lora() == (low_rank, None)
    assert DoraPatch(plain, magnitude, "out", "peft").low_rank() is None
    assert DoraPatch(plain, magnitude, "out", "peft").peft_lora() == (low_rank, magnitude)
    assert DoraPatch(plain, magnitude, "out", "lycoris").peft_lora() is None
    assert plain.rows(0, 3, 6).low_rank().up.shape == (3, 2)  # a LoRA's rows stay a LoRA
    assert loha.rows(0, 3, 6).low_rank() is None


def test_every_builtin_kind_reads_back_what_it_writes():
    """Real files of every kind (lycoris-lora, diffusers/PEFT DoRA): each patch's ``to_tensors``, read back by
    suffix role through ``build_patch``, is the same kind with the same change on the module."""
    from lora_pool import lora_files

    from lora_compat.oracles.models import make_sd15_components
    from lora_compat.patches.base import Ref
    from lora_compat.patches.build import suffix_role

    components = make_sd15_components(seed=100)
    seen = set()
    for name, path in lora_files().items():
        for target, patch in list(lora_compat.read(path).items())[:3]:
            component, _, module_path = target.partition(".")
            module = components[component].get_submodule(module_path)
            base = {param: t.detach().float() for param, t in module.named_parameters(recurse=False)}
            written = patch.to_tensors()
            rebuilt = build_patch({suffix_role(suffix): Ref.of(t, suffix) for suffix, t in written.items()})
            assert rebuilt.kinds == patch.kinds, (name, target)
            for param, delta in patch.delta(base, 0.7).items():
                torch.testing.assert_close(rebuilt.delta(base, 0.7)[param], delta, rtol=1e-6, atol=1e-6)
            seen.update(patch.kinds)
    assert seen == {"lora", "loha", "lokr", "ia3", "glora", "oft", "boft", "full", "norm", "dora"}
