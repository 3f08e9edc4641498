"""A key that the winning patch kind of its module does not read is listed unmatched, in every dialect (the shared
``ModuleReader``), never dropped in silence; the rest of the module still applies exactly."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat.archs import ModuleIndex
from lora_compat.models import resolve_patchset

diffusers = pytest.importorskip("diffusers")

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=8, ffn_dim=32, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)
REASON = "not applied: its module's other tensors form a patch that cannot hold it"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**TINY).eval()


def _tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"down": torch.randn(2, 16, generator=g), "up": torch.randn(16, 2, generator=g),
            "diff_b": torch.randn(16, generator=g)}


# (layout, module name, down suffix, up suffix, alpha, expected dialect)
LAYOUTS = [
    # kohya names with a LyCORIS suffix: the lycoris dialect's file (it reads kohya names through the same reader)
    ("kohya", "lora_unet_blocks_0_self_attn_q", "lora_down.weight", "lora_up.weight", 3.0, "lycoris"),
    ("diffusers", "transformer.blocks.0.attn1.to_q", "lora_A.weight", "lora_B.weight", None, "diffusers"),
]


@pytest.mark.parametrize("layout, module, down, up, alpha, dialect", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_diff_b_beside_a_lora_is_unmatched_not_dropped(model, tmp_path, layout, module, down, up, alpha, dialect):
    g = torch.Generator().manual_seed(1)
    t = _tensors(g)
    tensors = {f"{module}.{down}": t["down"], f"{module}.{up}": t["up"], f"{module}.diff_b": t["diff_b"]}
    if alpha is not None:
        tensors[f"{module}.alpha"] = torch.tensor(alpha)
    path = tmp_path / f"{layout}.safetensors"
    save_file(tensors, str(path))
    assert lora_compat.detect(path).dialect.id == dialect
    patchset = resolve_patchset(path, ModuleIndex.from_modules({"transformer": model}))
    assert patchset.unmatched == {f"{module}.diff_b": REASON}
    with pytest.warns(lora_compat.LoraCompatWarning, match="diff_b"):
        got = lora_compat.patched_weights(path, {"transformer": model}, 0.5)
    assert sorted(got) == ["transformer.blocks.0.attn1.to_q.weight"]  # the bias is untouched
    scale = (alpha / 2) if alpha is not None else 1.0
    expected = model.blocks[0].attn1.to_q.weight.detach() + 0.5 * scale * (t["up"] @ t["down"])
    torch.testing.assert_close(got["transformer.blocks.0.attn1.to_q.weight"], expected, rtol=0, atol=1e-6)


def test_native_dialect_reads_diff_b_beside_a_lora(model, tmp_path):
    """The native dialect's LoRA kind reads lightx2v's ``diff_b`` (a bias delta, unscaled): nothing unmatched."""
    g = torch.Generator().manual_seed(2)
    t = _tensors(g)
    name = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{name}.lora_down.weight": t["down"], f"{name}.lora_up.weight": t["up"],
               f"{name}.alpha": torch.tensor(2.0), f"{name}.diff_b": t["diff_b"]}, str(tmp_path / "n.safetensors"))
    patchset = resolve_patchset(tmp_path / "n.safetensors", ModuleIndex.from_modules({"transformer": model}))
    assert patchset.dialect == "native" and patchset.unmatched == {}
    got = lora_compat.patched_weights(tmp_path / "n.safetensors", {"transformer": model}, 0.5)
    q = model.blocks[0].attn1.to_q
    torch.testing.assert_close(got["transformer.blocks.0.attn1.to_q.bias"], q.bias.detach() + 0.5 * t["diff_b"],
                               rtol=0, atol=1e-6)
