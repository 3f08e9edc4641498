"""inspect/read details: triggers from metadata and sidecars, strict mode, packaging, OFT variants."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

import lora_compat
from lora_compat.tools.examples import kohya_sd15
from lora_compat.patches import OftPatch, Ref


def test_triggers_from_sidecars_metadata_and_tags(tmp_path):
    path = kohya_sd15(tmp_path / "style.safetensors")
    (tmp_path / "style.json").write_text(json.dumps({"activation text": "wc style, soft edges",
                                                     "preferred weight": 0.8}))
    (tmp_path / "style.civitai.info").write_text(json.dumps({"trainedWords": ["wcstyle"], "baseModel": "SD 1.5"}))
    assert lora_compat.inspect(path).triggers == ["wc style", "soft edges", "wcstyle", "watercolor", "painting", "1girl"]


def test_strict_turns_unmatched_keys_into_an_error(tmp_path):
    path = tmp_path / "extra.safetensors"
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2, 1, 1),
               "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 2)}
    save_file(tensors, str(path))
    info = lora_compat.inspect(path)
    assert info.unmatched == ["lora_unet_no_such_layer.lora_down.weight", "lora_unet_no_such_layer.lora_up.weight"]
    assert "matches no module" in info.unmatched_reasons["lora_unet_no_such_layer.lora_up.weight"]
    with pytest.raises(lora_compat.UnmatchedKeysError, match="lora_unet_no_such_layer") as caught:
        lora_compat.inspect(path, strict=True)
    assert caught.value.keys == info.unmatched


def test_read_gives_canonical_targets_with_lazy_tensors(tmp_path):
    path = kohya_sd15(tmp_path / "style.safetensors")
    patches = lora_compat.read(path)
    assert patches.base == "sd15" and patches.dialect == "kohya" and len(patches) == 264
    patch = patches["text_encoder.encoder.layers.0.self_attn.q_proj"]
    assert (patch.kind, patch.rank, patch.scale.value()) == ("lora", 2, 0.5)


def test_packages_map_into_the_lora_compat_namespace():
    import lora_compat.adapters
    import lora_compat.hooks

    assert lora_compat.hooks.PROJECT_NAME == "lora_compat"
    assert lora_compat.adapters.__name__ == "lora_compat.adapters"
    for top_level in ("adapters", "hooks"):  # these names belong to other projects
        spec = importlib.util.find_spec(top_level)
        assert spec is None or "lora_compat" not in str(spec.origin)


def test_core_does_not_import_diffusers_transformers_or_peft(tmp_path):
    import subprocess
    import sys

    path = kohya_sd15(tmp_path / "style.safetensors")
    code = ("import sys, lora_compat; info = lora_compat.inspect(sys.argv[1]); "
            "assert info.base == 'sd15'; "
            "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def _blocks(n: int = 3, b: int = 4) -> torch.Tensor:
    return torch.randn(n, b, b, generator=torch.Generator().manual_seed(0)) * 0.1


def _kohya_oft_delta(blocks: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """sd-scripts ``networks/oft.py`` in float64 (dialects.md §3.5): Q = B − Bᵀ clamped to norm alpha·out,
    R = (I + Q)(I − Q)⁻¹ per block, W'_k = R_kᵀ·W_k, ΔW = W' − W."""
    b64, w64 = blocks.double(), weight.double()
    q = b64 - b64.transpose(1, 2)
    norm = q.norm()
    q = q * ((norm.clamp(max=alpha * weight.shape[0]) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    rotation = torch.linalg.solve((eye - q).transpose(1, 2), (eye + q).transpose(1, 2)).transpose(1, 2)
    return _rotated(rotation, w64) - w64


def _rotated(rotation: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W'_k = R_kᵀ·W_k over the blocks of output rows, written with explicit loops."""
    b = rotation.shape[-1]
    return torch.cat([rotation[k].T @ weight[k * b:(k + 1) * b] for k in range(rotation.shape[0])])


def test_kohya_oft_equals_lycoris_oft_when_the_constraint_is_inactive():
    from lycoris.functional.diag_oft import diff_weight

    weight = torch.randn(12, 5)
    blocks = _blocks()
    kohya = OftPatch(Ref.of(blocks), 1e6, style="kohya").delta({"weight": weight})["weight"]
    lycoris = OftPatch(Ref.of(blocks), 0.0, style="lycoris").delta({"weight": weight})["weight"]
    torch.testing.assert_close(kohya, lycoris, rtol=1e-5, atol=1e-6)
    # each against its own reference: LyCORIS' own ΔW and sd-scripts' formula in float64
    torch.testing.assert_close(lycoris, diff_weight(weight, blocks, None, constraint=0, backend="torch"),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kohya, _kohya_oft_delta(blocks, weight, 1e6).float(), rtol=1e-5, atol=1e-6)


def test_kohya_oft_alpha_zero_is_the_identity_and_rotations_keep_row_norms():
    weight = torch.randn(12, 5)
    assert torch.allclose(OftPatch(Ref.of(_blocks()), 0.0, style="kohya").delta({"weight": weight})["weight"],
                          torch.zeros_like(weight), atol=1e-6)
    rotated = weight + OftPatch(Ref.of(_blocks()), 0.0, style="lycoris").delta({"weight": weight})["weight"]
    # an orthogonal map of each block of rows keeps the norm of every input column within the block
    torch.testing.assert_close(rotated.reshape(3, 4, 5).norm(dim=1), weight.reshape(3, 4, 5).norm(dim=1))


def test_legacy_oft_diag_stores_the_rotation_itself():
    """Legacy ``oft_diag`` holds LyCORIS' ``get_r()`` (dialects.md §3.5); the rotation is LyCORIS' own here."""
    from lycoris.functional.diag_oft import get_r

    weight = torch.randn(12, 5)
    blocks = _blocks()
    rotation = get_r(blocks)
    from_blocks = OftPatch(Ref.of(blocks), 0.0).delta({"weight": weight})["weight"]
    from_rotation = OftPatch(Ref.of(rotation), style="rotation").delta({"weight": weight})["weight"]
    torch.testing.assert_close(from_blocks, from_rotation)
    torch.testing.assert_close(from_rotation, (_rotated(rotation.double(), weight.double()) - weight.double()).float(),
                               rtol=1e-5, atol=1e-6)


def test_glora_old_layout_is_the_transposed_current_layout():
    from lora_compat.patches import GloraPatch

    gen = torch.Generator().manual_seed(1)
    out, in_, r = 6, 5, 2
    a1, a2, b1, b2 = (torch.randn(*s, generator=gen) for s in ((in_, r), (r, in_), (out, r), (r, in_)))
    weight = torch.randn(out, in_, generator=gen)
    current = GloraPatch(Ref.of(a1), Ref.of(a2), Ref.of(b1), Ref.of(b2))
    old = GloraPatch(Ref.of(a2), Ref.of(a1), Ref.of(b2), Ref.of(b1))
    assert (current.old_layout, old.old_layout) == (False, True)
    expected = weight @ a1 @ a2 + b1 @ b2
    torch.testing.assert_close(current.delta({"weight": weight})["weight"], expected)
    torch.testing.assert_close(old.delta({"weight": weight})["weight"], expected)
