"""Z-Image and Lumina 2 on tiny configs of diffusers' own classes (random weights, no hub): every layout applies
exactly. Expected weights come from diffusers (``load_lora_weights`` + ``fuse_lora``) on the files it loads, and, for
the native fused ``attention.qkv`` files diffusers cannot load (it names them after a module its model lacks; its
Lumina 2 converter cuts at the full-size 2304/768/768 rows), from diffusers on the split file the fused one was built
from in the test (block-diagonal, by hand)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat

from family_parity import peft_lora_file
from nextdit_names import native

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

TINY = {
    "z-image": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1,
                    n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 12, 12], axes_lens=[64, 32, 32]),
    # grouped-query attention as in the real model: k and v half as wide as q
    "lumina2": dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_refiner_layers=1,
                    num_attention_heads=4, num_kv_heads=2, multiple_of=16, cap_feat_dim=16, axes_dim_rope=(4, 6, 6),
                    axes_lens=(64, 32, 32)),
}
CLASSES = {"z-image": ("ZImageTransformer2DModel", "ZImagePipeline"),
           "lumina2": ("Lumina2Transformer2DModel", "Lumina2Pipeline")}
RANK, ALPHA = 4, 2.0
SCALE = ALPHA / RANK


def make_model(base: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(diffusers, CLASSES[base][0])(**TINY[base])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def linear_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def diffusers_file(base: str, model: torch.nn.Module, path: Path, seed: int = 1) -> Path:
    """A LoRA on every Linear module, written by peft + the pipeline's ``save_lora_weights``."""
    pipeline = getattr(diffusers, CLASSES[base][1])
    return peft_lora_file(model, path, pipeline, linear_modules(model), RANK, ALPHA, seed)


def split_factors(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers module → (down, up with the rank scale folded in)."""
    tensors = load_file(str(path))
    return {k.removeprefix("transformer.").removesuffix(".lora_A.weight"):
            (v, tensors[k.replace("lora_A", "lora_B")] * SCALE) for k, v in tensors.items() if "lora_A" in k}


def write(path: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], down: str, up: str,
          alpha: bool = False) -> Path:
    tensors = {}
    for name, (d, u) in factors.items():
        tensors[f"{name}.{down}"], tensors[f"{name}.{up}"] = d.contiguous(), u.contiguous()
        if alpha:  # alpha = rank: the scale is already in up
            tensors[f"{name}.alpha"] = torch.tensor(float(d.shape[0]))
    save_file(tensors, str(path))
    return path


def fused_factors(base: str, split: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  only: tuple[str, ...] = ("to_q", "to_k", "to_v")) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The native file of the same LoRA: q/k/v (those in ``only``) stacked into ``attention.qkv`` as one LoRA
    whose down stacks theirs and whose up is block-diagonal (rows of a part left out stay zero)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    groups: dict[str, list[str]] = {}
    for module in split:
        name = native(base, module)
        if name.endswith(".qkv"):
            groups.setdefault(name, []).append(module)
        else:
            out[name] = split[module]
    for name, modules in groups.items():
        modules.sort(key=lambda m: m[-1].replace("q", "0").replace("k", "1").replace("v", "2"))
        kept = [m for m in modules if m.endswith(only)]
        downs = [split[m][0] for m in kept]
        ups = [split[m][1] if m in kept else torch.zeros(split[m][1].shape[0], 0) for m in modules]
        up = torch.block_diag(*ups)
        out[name] = (torch.cat(downs), up[:, :sum(d.shape[0] for d in downs)])
    return out


def diffusers_fused(base: str, model: torch.nn.Module, path: Path, strength: float = 1.0) -> dict[str, torch.Tensor]:
    fused = copy.deepcopy(model)
    kwargs = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=fused)
    pipe = getattr(diffusers, CLASSES[base][1])(**kwargs)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return {f"transformer.{k}": v.detach() for k, v in fused.state_dict().items()}


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], model: torch.nn.Module,
                   changed: set[str] | None = None) -> None:
    base = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    if changed is None:
        changed = {k for k in expected if not torch.equal(expected[k], base[k])}
    assert sorted(got) == sorted(changed)  # every trained weight, and only those
    for name in changed:
        err = (got[name] - expected[name]).norm() / (expected[name] - base[name]).norm()
        assert err < 1e-5, (name, float(err))


@pytest.fixture(scope="module", params=list(TINY))
def family(request, tmp_path_factory):
    base = request.param
    model = make_model(base)
    out = tmp_path_factory.mktemp(base)
    source = diffusers_file(base, model, out / "diffusers.safetensors")
    split = split_factors(source)
    files = {
        "diffusers": source,
        "ai-toolkit": write(out / "aitk.safetensors", {f"diffusion_model.{m}": f for m, f in split.items()},
                            "lora_A.weight", "lora_B.weight"),
        "diffsynth": write(out / "diffsynth.safetensors", split, "lora_A.default.weight", "lora_B.default.weight"),
        "musubi": write(out / "musubi.safetensors", {"lora_unet_" + m.replace(".", "_"): f for m, f in split.items()},
                        "lora_down.weight", "lora_up.weight", alpha=True),
        "native": write(out / "native.safetensors",
                        {f"diffusion_model.{n}": f for n, f in fused_factors(base, split).items()},
                        "lora_A.weight", "lora_B.weight"),
        "native-kohya": write(out / "native_kohya.safetensors",
                              {f"diffusion_model.{n}": f for n, f in fused_factors(base, split).items()},
                              "lora_down.weight", "lora_up.weight", alpha=True),
        "kohya-fused": write(out / "kohya_fused.safetensors",
                             {"lora_unet_" + n.replace(".", "_"): f for n, f in fused_factors(base, split).items()},
                             "lora_down.weight", "lora_up.weight", alpha=True),
    }
    expected = {s: diffusers_fused(base, model, source, s) for s in (1.0, 0.6)}
    return base, model, files, expected, out


#: layouts diffusers' own loader accepts, per family (the rest are checked against the split file)
DIFFUSERS_LOADS = {"z-image": {"diffusers", "ai-toolkit", "diffsynth", "musubi"}, "lumina2": {"diffusers"}}
LAYOUTS = ["diffusers", "ai-toolkit", "diffsynth", "musubi", "native", "native-kohya", "kohya-fused"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_patched_weights_equal_diffusers(family, layout, strength):
    base, model, files, expected, _ = family
    if layout in DIFFUSERS_LOADS[base]:  # diffusers on this very file
        expected = {strength: diffusers_fused(base, model, files[layout], strength)}
    got = lora_compat.patched_weights(files[layout], {"transformer": model}, strength)
    assert_matches(got, expected[strength], model)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_files_are_named_for_their_family(family, layout):
    """No full-size shape fits a tiny file: its names make its family a candidate, and nothing is unmatched, but
    for Lumina 2's fused ``qkv`` read from the header alone: its uneven q/k/v rows are known from the model (the
    tests above apply it exactly), not from the full-size proportions (3:1:1; this tiny one is 2:1:1)."""
    base, _, files, _, _ = family
    detection = lora_compat.detect(files[layout])
    assert detection.base is None and base in detection.base_candidates
    unmatched = detection.patchset.unmatched
    if base == "lumina2" and layout in ("native", "native-kohya", "kohya-fused"):
        assert all(re.search(r"attention[._]qkv\.", k) for k in unmatched)
        assert all("at no other width in their proportions" in why for why in unmatched.values())
        assert len(unmatched) == 4 * (3 if layout != "native" else 2)
    else:
        assert unmatched == {}


def test_partial_qkv_is_block_diagonal(family, tmp_path):
    """A native file whose ``qkv`` holds q and v only (k's rows zero): k is untouched, q and v equal diffusers on
    the split file (its k left out)."""
    base, model, files, _, _ = family
    split = {m: f for m, f in split_factors(files["diffusers"]).items() if not m.endswith("to_k")}
    fused = fused_factors(base, split_factors(files["diffusers"]), only=("to_q", "to_v"))
    path = write(tmp_path / "qv.safetensors", {f"diffusion_model.{n}": f for n, f in fused.items()},
                 "lora_A.weight", "lora_B.weight")
    source = write(tmp_path / "qv_split.safetensors", {f"transformer.{m}": (d, u) for m, (d, u) in split.items()},
                   "lora_A.weight", "lora_B.weight")
    expected = diffusers_fused(base, model, source)
    got = lora_compat.patched_weights(path, {"transformer": model})
    weights = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    k_rows = [k for k in got if k.endswith("to_k.weight")]  # the file's k rows are zeros: k stays as it was
    assert k_rows and all(torch.equal(got.pop(k), weights[k]) for k in k_rows)
    assert_matches(got, expected, model)


def test_lora_dot_fused_qkv_equals_diffusers(tmp_path):
    """Z-Image's ``.lora.down.weight`` form with one fused ``qkv`` (the one fused form diffusers splits: one down
    shared by q, k and v)."""
    base = "z-image"
    model = make_model(base)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for block in ("layers.0", "layers.1", "context_refiner.0"):
        for name, rows in ((f"{block}.attention.qkv", 192), (f"{block}.attention.out", 64),
                           (f"{block}.feed_forward.w2", 64)):
            columns = 64 if not name.endswith("w2") else model.get_submodule(f"{block}.feed_forward.w2").in_features
            key = f"diffusion_model.{name}"
            tensors[f"{key}.lora.down.weight"] = torch.randn(RANK, columns, generator=g)
            tensors[f"{key}.lora.up.weight"] = torch.randn(rows, RANK, generator=g)
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    path = tmp_path / "lora_dot.safetensors"
    save_file(tensors, str(path))
    got = lora_compat.patched_weights(path, {"transformer": model})
    assert_matches(got, diffusers_fused(base, model, path), model)


def test_lokr_equals_diffusers(tmp_path):
    """ai-toolkit's Z-Image LoKr (diffusers names under ``diffusion_model.``, ``lokr_w1`` + ``lokr_w2_a/_b``)."""
    base = "z-image"
    model = make_model(base)
    g = torch.Generator().manual_seed(6)
    tensors = {}
    for name in ("layers.0.attention.to_q", "layers.1.attention.to_out.0", "noise_refiner.0.attention.to_v"):
        out, columns = model.get_submodule(name).weight.shape
        key = f"diffusion_model.{name}"
        tensors[f"{key}.lokr_w1"] = torch.randn(4, 4, generator=g)
        tensors[f"{key}.lokr_w2_a"] = torch.randn(out // 4, 2, generator=g)
        tensors[f"{key}.lokr_w2_b"] = torch.randn(2, columns // 4, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "lokr.safetensors"
    save_file(tensors, str(path))
    detection = lora_compat.detect(path)
    assert (detection.dialect.id, detection.patchset.kinds) == ("native", ["lokr"])
    for strength in (1.0, 0.7):
        got = lora_compat.patched_weights(path, {"transformer": model}, strength)
        assert_matches(got, diffusers_fused(base, model, path, strength), model)


def test_patcher_equals_diffusers_and_restores(family):
    base, model, files, expected, _ = family
    live = copy.deepcopy(model)
    before = {k: v.clone() for k, v in live.state_dict().items()}
    patcher = lora_compat.Patcher(live)  # the component comes from the family's class names
    patcher.set([(files["native"], 0.6)])
    assert_matches({f"transformer.{k}": v for k, v in live.state_dict().items() if not torch.equal(v, before[k])},
                   expected[0.6], model)
    patcher.set([])
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())


@pytest.mark.parametrize("chain", [("diffusers", "native"), ("kohya", "native"), ("native", "diffusers"),
                                   ("native", "kohya", "diffusers")])
def test_convert_round_trips_stay_exact(family, tmp_path, chain):
    """native (fused qkv) → diffusers (split) → native (fused again, block-diagonal) and through kohya: every file
    still equals diffusers' weights, and each is in its target's names."""
    base, model, files, expected, _ = family
    source = files["native"]
    for step, target in enumerate(chain):
        out = tmp_path / f"step{step}_{target}.safetensors"
        # with the model at hand: a tiny Lumina 2's q/k/v rows (2:1:1) are not the full-size proportions (3:1:1)
        lora_compat.convert(source, target, out, components={"transformer": model})
        source = out
    keys = sorted(load_file(str(source)))
    prefix = {"native": "diffusion_model.", "kohya": "lora_unet_", "diffusers": "transformer."}[chain[-1]]
    assert all(k.startswith(prefix) for k in keys), keys[:3]
    fused = {"native": ".attention.qkv.", "kohya": "_attention_qkv.", "diffusers": None}[chain[-1]]
    assert any(fused in k for k in keys) if fused else not any("qkv" in k for k in keys)
    assert_matches(lora_compat.patched_weights(source, {"transformer": model}), expected[1.0], model)


def test_partial_qkv_round_trips(family, tmp_path):
    """Split q and v only → native: one ``qkv`` whose k rows are zero → diffusers: q and v again (k as a LoRA of
    zero delta). (One
    ``to_out.0`` rides along: with the base given, a tiny file is read by name once one of its modules is a misfit
    of the full-size table; a fused module at another width alone is reported unmatched instead.)"""
    base, model, files, _, _ = family
    split = {m: f for m, f in split_factors(files["diffusers"]).items()
             if m.endswith(("to_q", "to_v")) or m == f"layers.0.{'attention' if base == 'z-image' else 'attn'}.to_out.0"}
    source = write(tmp_path / "qv.safetensors", {f"transformer.{m}": f for m, f in split.items()},
                   "lora_A.weight", "lora_B.weight")
    expected = lora_compat.patched_weights(source, {"transformer": model})
    lora_compat.convert(source, "native", tmp_path / "qv_native.safetensors", components={"transformer": model})
    native_keys = load_file(str(tmp_path / "qv_native.safetensors"))
    assert {k.rpartition(".attention.")[2].partition(".")[0] for k in native_keys} == {"qkv", "out"}
    lora_compat.convert(tmp_path / "qv_native.safetensors", "diffusers", tmp_path / "back.safetensors",
                        components={"transformer": model})
    back = lora_compat.patched_weights(tmp_path / "back.safetensors", {"transformer": model})
    weights = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    # k comes back as the fused module's zero rows: a LoRA that changes nothing
    k_rows = [k for k in back if k.endswith("to_k.weight")]
    assert all(torch.equal(back.pop(k), weights[k]) for k in k_rows)
    assert sorted(back) == sorted(expected) and all(torch.allclose(back[k], expected[k], atol=1e-6) for k in back)


def test_convert_without_a_model_uses_the_files_own_rows(tmp_path):
    """No model at hand (``base`` only): Z-Image's equal q/k/v thirds are laid out at the width the file's own
    tensors give, so a tiny native file still converts to diffusers and back exactly."""
    model = make_model("z-image")
    source = diffusers_file("z-image", model, tmp_path / "zi.safetensors")
    expected = diffusers_fused("z-image", model, source)
    for step, target in enumerate(("native", "diffusers", "native")):
        out = tmp_path / f"step{step}.safetensors"
        lora_compat.convert(source, target, out, base="z-image")
        source = out
    assert any(".attention.qkv." in k for k in load_file(str(source)))
    assert_matches(lora_compat.patched_weights(source, {"transformer": model}), expected, model)


@pytest.mark.parametrize("base", list(TINY))
def test_lycoris_kinds_equal_lycoris_forward(base, tmp_path):
    """LoKr (ai-toolkit: diffusers names under ``diffusion_model.``) and LoHa (kohya ``lora_unet_``) on these names,
    built by lycoris-lora on the tiny model's modules; expected = the weights LyCORIS' own forward pass implies."""
    pytest.importorskip("lycoris")
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    from lora_compat.oracles.lycoris_oracle import _forward_params

    model = make_model(base)
    hooked = copy.deepcopy(model)
    attention = "attention" if base == "z-image" else "attn"
    ffn = "feed_forward.w1" if base == "z-image" else "feed_forward.linear_1"
    chosen = {f"layers.0.{attention}.to_k": (LokrModule, dict(factor=4)), f"noise_refiner.0.{ffn}": (LohaModule, {}),
              f"layers.1.{attention}.to_out.0": (LokrModule, dict(factor=4))}
    g = torch.Generator().manual_seed(9)
    tensors, modules = {}, []
    for name, (kind, extra) in chosen.items():
        module = kind(name, hooked.get_submodule(name), multiplier=0.7, lora_dim=2, alpha=1.0, **extra)
        with torch.no_grad():
            for param_name, p in module.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        module.apply_to()
        modules.append(module)
        key = f"diffusion_model.{name}" if kind is LokrModule else "lora_unet_" + name.replace(".", "_")
        tensors.update({f"{key}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()})
    lokr = {k: v for k, v in tensors.items() if k.startswith("diffusion_model.")}
    loha = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    save_file(loha, str(tmp_path / "loha.safetensors"))
    for path, names in ((tmp_path / "lokr.safetensors", [n for n, (k, _) in chosen.items() if k is LokrModule]),
                        (tmp_path / "loha.safetensors", [n for n, (k, _) in chosen.items() if k is LohaModule])):
        got = lora_compat.patched_weights(path, {"transformer": model}, 0.7)
        assert sorted(got) == sorted(f"transformer.{n}.weight" for n in names)
        for name in names:
            want, _ = _forward_params(hooked.get_submodule(name))
            before = model.get_submodule(name).weight
            err = (got[f"transformer.{name}.weight"] - want).norm() / (want - before).norm()
            assert err < 1e-5, (name, float(err))
