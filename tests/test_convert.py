"""``convert``: exact round trips between dialects, files plain diffusers loads, SVD compression with an honest
error report, refusals."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_compat
from lora_compat import LoraCompatError
from lora_compat.cli import main

from lora_compat.oracles.lycoris_oracle import ALGOS, write_lycoris_file
from lora_compat.oracles.models import make_sd15_components
from lora_compat.oracles.peft_oracle import write_peft_file
from flux_models import PARTIAL, diffusers_file, kohya_flux_file, make_bfl_host, make_flux, split_view

warnings.filterwarnings("ignore", category=lora_compat.LoraCompatWarning)


@pytest.fixture(scope="module")
def sd15():
    return make_sd15_components(seed=100)


def same_weights(a: Path, b: Path, components: dict, strength: float = 0.8, tol: float = 1e-6) -> None:
    """Both files give the same effective weights (``patched_weights`` equal, fp32 rel. error < tol); a
    parameter only one of them touches must come out unchanged (a zero part of a fused module)."""
    wa = lora_compat.patched_weights(a, components, strength)
    wb = lora_compat.patched_weights(b, components, strength)
    base = {f"{c}.{n}": p.detach() for c, m in components.items() for n, p in m.named_parameters()}
    assert wa
    for key in wa.keys() | wb.keys():
        va, vb = wa.get(key, base[key]), wb.get(key, base[key])
        rel = float((va - vb).norm() / va.norm())
        assert rel < tol, (key, rel)


def test_kohya_to_diffusers_to_kohya_is_exact(tmp_path: Path, sd15) -> None:
    source, _ = write_lycoris_file(tmp_path, sd15, "lora", seed=1)
    diffusers = tmp_path / "diffusers.safetensors"
    report = lora_compat.convert(source, "diffusers", diffusers)
    assert (report.source_dialect, report.target) == ("kohya", "diffusers")  # a plain LoRA: kohya's
    assert lora_compat.inspect(diffusers).dialect == "diffusers"
    assert not any(k.endswith(".alpha") for k in load_file(str(diffusers)))
    back = tmp_path / "kohya.safetensors"
    lora_compat.convert(diffusers, "kohya", back)
    assert lora_compat.inspect(back).dialect == "kohya"
    same_weights(source, diffusers, sd15)
    same_weights(source, back, sd15)


@pytest.mark.parametrize("variant", ALGOS)
def test_lycoris_kohya_names_to_webui_names_keep_the_kind(tmp_path: Path, sd15, variant: str) -> None:
    source, _ = write_lycoris_file(tmp_path, sd15, variant, seed=2)
    out = tmp_path / "webui.safetensors"
    lora_compat.convert(source, "webui", out)
    keys = list(load_file(str(out)))
    assert all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                             "lora_unet_time_embed", "lora_unet_out", "lora_unet_label_emb", "lora_te_text_model_"))
               for k in keys), keys[:3]
    assert lora_compat.inspect(out).kinds == lora_compat.inspect(source).kinds
    same_weights(source, out, sd15)


@pytest.mark.parametrize("kind", ["partial", "kohya"])
def test_flux_diffusers_to_bfl_to_diffusers_is_exact(tmp_path: Path, kind: str) -> None:
    """Split q/k/v (trained separately) go into one fused qkv LoRA block-diagonally; back, exactly."""
    model = make_flux()
    source = (diffusers_file(tmp_path / "src.safetensors", model, PARTIAL) if kind == "partial"
              else kohya_flux_file(tmp_path / "src.safetensors", model))
    bfl, back = tmp_path / "bfl.safetensors", tmp_path / "back.safetensors"
    lora_compat.convert(source, "bfl", bfl, components={"transformer": model})
    keys = list(load_file(str(bfl)))
    assert all(k.startswith("diffusion_model.") for k in keys) and lora_compat.inspect(bfl).dialect == "bfl"
    lora_compat.convert(bfl, "diffusers", back, components={"transformer": model})
    components = {"transformer": model}
    same_weights(source, bfl, components)
    same_weights(source, back, components)
    # and on a fused host, the bfl file equals the source
    a, b = make_bfl_host(model), make_bfl_host(model)
    lora_compat.Patcher({"transformer": a}).set([(source, 0.8)])
    lora_compat.Patcher({"transformer": b}).set([(bfl, 0.8)])
    for key, value in split_view(a, model).items():
        other = split_view(b, model)[key]
        assert float((value - other).norm()) <= 1e-6 * float(value.norm()), key


def test_converted_diffusers_file_loads_in_plain_diffusers(tmp_path: Path, sd15) -> None:
    """No lora_compat involved in loading: diffusers' own load_lora_weights + fuse_lora."""
    import copy

    from diffusers import StableDiffusionPipeline

    (tmp_path / "src").mkdir()
    source, _ = write_lycoris_file(tmp_path / "src", sd15, "lora", seed=3)
    out = tmp_path / "pytorch_lora_weights.safetensors"
    lora_compat.convert(source, "diffusers", out)
    components = {k: copy.deepcopy(m) for k, m in sd15.items()}
    pipe = StableDiffusionPipeline(vae=None, text_encoder=components["text_encoder"], tokenizer=None,
                                   unet=components["unet"], scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out), adapter_name="converted")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    want = lora_compat.patched_weights(source, sd15, 1.0)
    params = {f"{c}.{n.replace('.base_layer', '')}": p for c, m in components.items()
              for n, p in m.named_parameters() if ".lora_" not in n}
    for key, value in want.items():
        rel = float((params[key] - value).norm() / value.norm())
        assert rel < 1e-5, (key, rel)


def test_converted_peft_folder_reads_back(tmp_path: Path, sd15) -> None:
    path, _ = write_peft_file(tmp_path, {"unet": sd15["unet"]}, "diffusers")
    out = tmp_path / "peft_adapter"
    lora_compat.convert(path, "peft", out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]
    assert lora_compat.inspect(out / "adapter_model.safetensors").dialect == "peft"
    same_weights(path, out / "adapter_model.safetensors", {"unet": sd15["unet"]})


def test_kinds_diffusers_cannot_hold_are_refused_with_the_way_out(tmp_path: Path, sd15) -> None:
    source, _ = write_lycoris_file(tmp_path, sd15, "loha", seed=4)
    with pytest.raises(LoraCompatError, match=r"is a loha patch, which the diffusers dialect cannot hold; pass "
                                              r"rank=R \(--rank R\)"):
        lora_compat.convert(source, "diffusers", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "oft").mkdir()
    oft, _ = write_lycoris_file(tmp_path / "oft", sd15, "diag_oft", seed=4)
    with pytest.raises(LoraCompatError, match=r"depends on the base weights"):
        lora_compat.convert(oft, "diffusers", tmp_path / "y.safetensors", rank=4)


@pytest.mark.parametrize("rank", [1, 3])
def test_svd_compression_reports_the_error_it_makes(tmp_path: Path, sd15, rank: int) -> None:
    source, _ = write_lycoris_file(tmp_path, sd15, "loha", seed=5)
    out = tmp_path / "svd.safetensors"
    report = lora_compat.convert(source, "diffusers", out, rank=rank, components=sd15)
    assert len(report.svd_errors) == lora_compat.inspect(source).targets
    base = {f"{c}.{n}": p.detach() for c, m in sd15.items() for n, p in m.named_parameters()}
    exact = lora_compat.patched_weights(source, sd15, 1.0)
    approx = lora_compat.patched_weights(out, sd15, 1.0)
    num = den = 0.0
    for target, reported in report.svd_errors.items():
        key = f"{target}.weight"
        delta, got = exact[key] - base[key], approx[key] - base[key]
        measured = float((got - delta).norm() / delta.norm())
        assert measured == pytest.approx(reported, rel=1e-3, abs=1e-6), target
        num += float((got - delta).norm()) ** 2
        den += float(delta.norm()) ** 2
    assert (num / den) ** 0.5 == pytest.approx(report.overall_error, rel=1e-3)
    assert 0 < report.overall_error < 1


def test_metadata_is_kept(tmp_path: Path, sd15) -> None:
    source, _ = write_lycoris_file(tmp_path, sd15, "lora", seed=6)
    tensors = load_file(str(source))
    save_file(tensors, str(tmp_path / "tagged.safetensors"),
              metadata={"ss_tag_frequency": json.dumps({"x": {"watercolor": 9}}), "ss_base_model_version": "sd_v1"})
    lora_compat.convert(tmp_path / "tagged.safetensors", "diffusers", tmp_path / "out.safetensors")
    info = lora_compat.inspect(tmp_path / "out.safetensors")
    assert info.triggers == ["watercolor"]
    assert info.metadata["lora_compat.source_dialect"] == "kohya"
    assert json.loads(info.metadata["lora_adapter_metadata"])["unet.r"] >= 1


def test_cli_convert(tmp_path: Path, sd15, capsys) -> None:
    source, _ = write_lycoris_file(tmp_path, sd15, "loha", seed=7)
    assert main(["convert", str(source), "--to", "diffusers", "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "--rank R" in capsys.readouterr().err
    (tmp_path / "lora").mkdir()
    lora, _ = write_lycoris_file(tmp_path / "lora", sd15, "lora", seed=7)
    assert main(["convert", str(lora), "--to", "diffusers", "-o", str(tmp_path / "o.safetensors")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / 'o.safetensors'}: kohya -> diffusers, base sd15")
    same_weights(lora, tmp_path / "o.safetensors", sd15)



@pytest.mark.parametrize("variant", ["lora", "loha", "lokr"])
def test_converted_kohya_file_loads_with_lycoris_own_loader(tmp_path: Path, sd15, variant: str) -> None:
    """The UNet part of a converted kohya file, loaded by lycoris-lora's kohya loader, gives our weights."""
    import copy

    from lycoris.kohya import create_network_from_weights

    from lora_compat.oracles.lycoris_oracle import _isolated_preset_state
    from lora_compat.oracles.models import one_thread

    source, _ = write_lycoris_file(tmp_path, sd15, variant, seed=8)
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(str(source)).items() if k.startswith("lora_unet_")}, str(unet_only),
              metadata={"ss_base_model_version": "sd_v1"})
    out = tmp_path / "kohya.safetensors"
    lora_compat.convert(unet_only, "kohya", out)
    want_model = copy.deepcopy(sd15["unet"])
    lora_compat.Patcher({"unet": want_model}).set([(out, 1.0)])
    theirs = copy.deepcopy(sd15["unet"])
    with one_thread(), _isolated_preset_state():
        # lycoris' default preset targets time_embedding.linear_1 by name and by module type, and then asserts
        # on the duplicate it made (in the throw-away network the loader builds first); target no names
        from lycoris.kohya import LycorisNetworkKohya

        LycorisNetworkKohya.UNET_TARGET_REPLACE_NAME = []
        network, _ = create_network_from_weights(1.0, str(out), None, None, theirs, for_inference=True)
        network.apply_to(None, theirs, apply_text_encoder=False, apply_unet=True)
        network.load_weights(str(out))
        network.eval()
    assert len(network.unet_loras) == lora_compat.inspect(out).targets
    g = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    with torch.no_grad():
        got = theirs(sample, torch.tensor([10]), encoder_hidden_states=hidden).sample
        want = want_model(sample, torch.tensor([10]), encoder_hidden_states=hidden).sample
    assert float((got - want).norm() / want.norm()) < 1e-5
