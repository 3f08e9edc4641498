"""Numerical oracle: real LyCORIS files written by lycoris-lora on tiny random models.

`write_lycoris_file` builds a network with lycoris' kohya wrapper (`lycoris.kohya.create_network`, naming
`lora_unet_*`, `lora_te_*` or `lora_te1_*`/`lora_te2_*`), fills every LyCORIS parameter with seeded random
values, saves it with the network's own `save_weights()`, and returns the merged weights that LyCORIS' FORWARD
PASS implies. The merge path (`get_diff_weight`/`merge_to`) is not used: in lycoris-lora 4.1.3 it applies
alpha/rank twice for LoHa and LoKr.

Variants (network_dim, network_alpha, extra network args; conv_dim/conv_alpha apply to kxk>1 convs only):

  lora                 4, 2, conv_dim=2 conv_alpha=3            LoRA on Linear + LoCon on 1x1/3x3 convs
  lora_tucker          4, 2, conv_dim=2 conv_alpha=1 use_tucker  3x3 convs get lora_mid
  loha / loha_tucker   4, 2, conv_dim=2 conv_alpha=1 [use_tucker] tucker: hada_t1/hada_t2 on 3x3 convs
  lokr                 1, 0.5, factor=-1                        lokr_w1 + lokr_w2_a/_b (rank 1)
  lokr_full            4, 2, full_matrix=True                   lokr_w1 + lokr_w2 only (scale forced to 1)
  lokr_decompose_both  1, 0.5, decompose_both=True              lokr_w1_a/_b, lokr_w1 where that side is too small
  lokr_tucker          2, 1, factor=2 use_tucker=True           3x3 convs get lokr_t2; small layers a full lokr_w2
  ia3                  custom preset: to_k, to_v, ff.net.2 / k_proj, v_proj, mlp.fc2 (ff/fc2 train_on_input)
  glora                4, 2, conv_dim=2 conv_alpha=1            a1/a2/b1/b2 on Linear and convs
  diag_oft             4, rescaled=True, constraint=0           oft_blocks [n, b, b] + rescale
  boft                 4, rescaled=True, constraint=0           oft_blocks [m, n, b, b] + rescale
  full                 diff (+ diff_b where the layer has a bias)
  norm                 LoRA as `lora` + train_norm=True: w_norm/b_norm on every GroupNorm/LayerNorm in scope
  dora_out / dora_in   LoRA + dora_wd, wd_on_output=True ([out,1,..] dora_scale) / False ([1,in,..])
  loha_dora, lokr_dora LoHa / LoKr as above + dora_wd (wd_on_output=True)

Every variant of the list above is produced; none had to be left out.

Scope (all variants but ia3): UNet classes Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D,
TimestepEmbedding (time_embedding and SDXL add_embedding) plus conv_in, conv_out, conv_norm_out; text encoders:
every CLIPEncoderLayer (q/k/v/out_proj, fc1/fc2, layer_norm1/2) plus text_projection (SDXL text_encoder_2;
real trainers leave it out) and final_layer_norm. 4.1.3's built-in "full" preset lists TimestepEmbedding AND
time_embedding.linear_1/2 by name, which creates duplicate modules and asserts on diffusers UNets, hence the
custom preset. The network is built over fp32 deep copies, so files and `expected` are fp32 for any model dtype.

What the forward pass does at multiplier m (verified once against closed forms built from the saved tensors
for every variant at m = 1 and 0.7; test_oracle_lycoris_selfcheck.py re-checks `lora`):
  lora/loha/lokr/glora/full/norm: W + m*dW (and b + m*diff_b, w + m*w_norm, b + m*b_norm); low-rank dW is
    scaled once by alpha/r. LoKr: scale 1 when w1 and w2 are both full (the saved alpha is then network_dim).
    GLoRA: dW = alpha/r * (W @ a1 @ a2 + b1 @ b2), a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in(, kh, kw)].
  DoRA (all three): W' = (W + dW) * (m*(dora_scale / (||W + dW|| + eps) - 1) + 1), dW NOT multiplied by m (m=0
    gives W + dW); the norm is per output row over (in, kh, kw) for wd_on_output, else per input channel.
  ia3: W * (1 + m*w) on output rows, or on input columns when on_input == 1.
  diag_oft: row blocks W_k' = rescale * (m*R_k + (1-m)*I)^T W_k, R = (I+Q)(I-Q)^-1, Q = B - B^T.
  boft: each butterfly stage R_i -> m*R_i + (1-m)*I (lycoris.functional.boft._diff_weight), then * rescale.
  The rescale of both OFT variants is applied at full strength whatever m is.
"""
from __future__ import annotations

import contextlib
import copy
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import require

require("lycoris-lora", "toml")

import toml  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lycoris.kohya import LycorisNetworkKohya, create_network  # noqa: E402
from lycoris.modules.base import LycorisBaseModule  # noqa: E402
from torch import nn  # noqa: E402

from .models import one_thread  # noqa: E402

_UNET_MODULES = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding"]
_UNET_NAMES = ["conv_in", "conv_out", "conv_norm_out"]
_TE_MODULES = ["CLIPEncoderLayer"]
_TE_NAMES = ["text_projection", "text_model.final_layer_norm"]

_FULL_PRESET: dict[str, Any] = {
    "enable_conv": True,
    "use_fnmatch": False,
    "unet_target_module": _UNET_MODULES,
    "unet_target_name": _UNET_NAMES,
    "text_encoder_target_module": _TE_MODULES,
    "text_encoder_target_name": _TE_NAMES,
}
# 4.1.3's "ia3" preset names ("to_k", ...) are anchored regexes that never match a diffusers path.
_IA3_PRESET: dict[str, Any] = {
    "enable_conv": False,
    "use_fnmatch": True,
    "unet_target_module": [],
    "unet_target_name": ["*to_k", "*to_v", "*ff.net.2"],
    "text_encoder_target_module": [],
    "text_encoder_target_name": ["*k_proj", "*v_proj", "*mlp.fc2"],
    "name_algo_map": {"*ff.net.2": {"train_on_input": True}, "*mlp.fc2": {"train_on_input": True}},
}

_LOCON = {"conv_dim": 2, "conv_alpha": 1.0}
# variant -> (network_dim, network_alpha, network args, preset)
_VARIANTS: dict[str, tuple[int, float, dict[str, Any], dict[str, Any]]] = {
    "lora": (4, 2.0, {"algo": "lora", "conv_dim": 2, "conv_alpha": 3.0}, _FULL_PRESET),
    "lora_tucker": (4, 2.0, {"algo": "lora", **_LOCON, "use_tucker": True}, _FULL_PRESET),
    "loha": (4, 2.0, {"algo": "loha", **_LOCON}, _FULL_PRESET),
    "loha_tucker": (4, 2.0, {"algo": "loha", **_LOCON, "use_tucker": True}, _FULL_PRESET),
    "lokr": (1, 0.5, {"algo": "lokr", "factor": -1}, _FULL_PRESET),
    "lokr_full": (4, 2.0, {"algo": "lokr", "full_matrix": True}, _FULL_PRESET),
    "lokr_decompose_both": (1, 0.5, {"algo": "lokr", "decompose_both": True}, _FULL_PRESET),
    "lokr_tucker": (2, 1.0, {"algo": "lokr", "factor": 2, "use_tucker": True}, _FULL_PRESET),
    "ia3": (4, 1.0, {"algo": "ia3"}, _IA3_PRESET),
    "glora": (4, 2.0, {"algo": "glora", **_LOCON}, _FULL_PRESET),
    "diag_oft": (4, 1.0, {"algo": "diag-oft", "rescaled": True}, _FULL_PRESET),
    "boft": (4, 1.0, {"algo": "boft", "rescaled": True}, _FULL_PRESET),
    "full": (4, 1.0, {"algo": "full"}, _FULL_PRESET),
    "norm": (4, 2.0, {"algo": "lora", **_LOCON, "train_norm": True}, _FULL_PRESET),
    "dora_out": (4, 2.0, {"algo": "lora", **_LOCON, "dora_wd": True, "wd_on_output": True}, _FULL_PRESET),
    "dora_in": (4, 2.0, {"algo": "lora", **_LOCON, "dora_wd": True, "wd_on_output": False}, _FULL_PRESET),
    "loha_dora": (4, 2.0, {"algo": "loha", **_LOCON, "dora_wd": True}, _FULL_PRESET),
    "lokr_dora": (1, 0.5, {"algo": "lokr", "dora_wd": True}, _FULL_PRESET),
}
ALGOS: tuple[str, ...] = tuple(_VARIANTS)
# Written files only, not in ALGOS: LyCORIS' forward is no oracle for them. DyLoRA's forward picks a random rank
# block per call and scales by alpha / (blocks in play); its saved file is a plain LoRA (alpha / r, dialects.md
# §1.5) whose conv modules have a 2-D lora_up [out, r] next to a 4-D lora_down.
_FILE_ONLY: dict[str, tuple[int, float, dict[str, Any], dict[str, Any]]] = {
    "dylora": (4, 2.0, {"algo": "dylora", "conv_dim": 4, "conv_alpha": 3.0, "block_size": 2}, _FULL_PRESET),
}
FILE_ONLY_ALGOS: tuple[str, ...] = tuple(_FILE_ONLY)

# Class attributes that LycorisNetworkKohya.apply_preset mutates (and never resets when a preset omits them).
_PRESET_ATTRS = ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME",
                 "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


@contextlib.contextmanager
def _isolated_preset_state() -> Iterator[None]:
    """Start from empty algo maps/excludes and restore LycorisNetworkKohya's class-level preset afterwards."""
    saved = {name: getattr(LycorisNetworkKohya, name) for name in _PRESET_ATTRS}
    LycorisNetworkKohya.MODULE_ALGO_MAP, LycorisNetworkKohya.NAME_ALGO_MAP = {}, {}
    LycorisNetworkKohya.TARGET_EXCLUDE_NAME = []
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(LycorisNetworkKohya, name, value)


def _create(components: dict[str, nn.Module], variant: str, multiplier: float) -> LycorisNetworkKohya:
    """create_network() over `components` with the variant's args and preset (passed as a toml file)."""
    dim, alpha, args, preset = {**_VARIANTS, **_FILE_ONLY}[variant]
    te: nn.Module | list[nn.Module] = components["text_encoder"]
    if "text_encoder_2" in components:
        te = [components["text_encoder"], components["text_encoder_2"]]
    with tempfile.TemporaryDirectory() as tmp, _isolated_preset_state():
        preset_path = Path(tmp) / "preset.toml"
        preset_path.write_text(toml.dumps(preset))
        return create_network(multiplier, dim, alpha, None, te, components["unet"],
                              warn_on_unmatched=False, preset=str(preset_path), **args)


@torch.no_grad()
def _randomize(loras: list[LycorisBaseModule], seed: int) -> None:
    """Seeded non-zero values for every LyCORIS parameter (dora_scale/rescale stay near their init)."""
    gen = torch.Generator().manual_seed(seed)
    for lora in loras:
        for name, p in lora.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "dora_scale":
                p.mul_(0.5 + torch.rand(p.shape, generator=gen))
            elif leaf == "rescale":
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # FullModule's weight/bias are still the diff here (is_diff until apply_to)
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


@contextlib.contextmanager
def _unit_conv(conv: nn.Conv2d, lora: LycorisBaseModule) -> Iterator[None]:
    """Stride 1, padding 0 on the conv and on the op kwargs the LyCORIS forward passes to F.conv2d."""
    assert conv.padding_mode == "zeros" and conv.groups == 1 and conv.dilation == (1, 1)
    saved = conv.stride, conv.padding, lora.kw_dict
    conv.stride, conv.padding = (1, 1), (0, 0)
    lora.kw_dict = {**lora.kw_dict, "stride": (1, 1), "padding": (0, 0)}
    try:
        yield
    finally:
        conv.stride, conv.padding, lora.kw_dict = saved


def _norm_probe(module: nn.LayerNorm | nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """An input x and its affine-free normalisation; every element of the latter is about +-1."""
    if isinstance(module, nn.LayerNorm):
        (c,) = module.normalized_shape
        x = torch.tensor([(-1.0) ** i for i in range(c)]).unsqueeze(0)
        return x, F.layer_norm(x, module.normalized_shape, eps=module.eps)
    x = torch.tensor([1.0, -1.0]).expand(1, module.num_channels, 2).contiguous()
    return x, F.group_norm(x, module.num_groups, eps=module.eps)


def _zero_and_one_hots(n: int) -> torch.Tensor:
    """[n + 1, n]: a zero row, then the identity."""
    return torch.cat([torch.zeros(1, n), torch.eye(n)])


@torch.no_grad()
def _forward_params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) implied by module's (LyCORIS-hooked) forward; the conv must already be unit-strided."""
    if isinstance(module, nn.Linear):
        y = module(_zero_and_one_hots(module.in_features))
        return (y[1:] - y[0]).T.contiguous(), y[0]
    if isinstance(module, nn.Conv2d):
        c, (kh, kw) = module.in_channels, module.kernel_size
        n = c * kh * kw
        y = module(_zero_and_one_hots(n).view(n + 1, c, kh, kw))[:, :, 0, 0]
        return (y[1:] - y[0]).T.reshape(-1, c, kh, kw).contiguous(), y[0]
    # Norms (train_norm): taken from NormModule's forward, y = norm(x) * w' + b' with norm(x) = +-1/sqrt(1+eps).
    x, normed = _norm_probe(module)
    y0 = module(torch.zeros_like(x))
    w = (module(x) - y0) / normed
    return (w[0], y0[0]) if isinstance(module, nn.LayerNorm) else (w[0, :, 0], y0[0, :, 0])


def _expected(network: LycorisNetworkKohya, copies: dict[str, nn.Module],
              originals: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Merged fp32 value of every parameter the applied network changes, keyed "<component>.<param>"."""
    where = {id(m): (comp, name) for comp, root in copies.items() for name, m in root.named_modules()}
    expected: dict[str, torch.Tensor] = {}
    for lora in network.loras:
        if lora.not_supported:
            continue
        module = lora.org_module[0]
        assert module.forward == lora.forward, f"{lora.lora_name} is not hooked"
        comp, name = where[id(module)]
        conv = _unit_conv(module, lora) if isinstance(module, nn.Conv2d) else contextlib.nullcontext()
        with conv:
            weight, bias = _forward_params(module)
        original_bias = originals[comp].get_submodule(name).bias
        expected[f"{comp}.{name}.weight"] = weight
        # Only `full` (diff_b) and `norm` (b_norm) change biases; others return the original bias bit-exactly.
        if original_bias is not None and not torch.equal(bias, original_bias.float()):
            expected[f"{comp}.{name}.bias"] = bias
    return expected


def write_lycoris_file(tmp_dir: Path, components: dict[str, nn.Module], variant: str, seed: int = 0,
                       multiplier: float = 1.0) -> tuple[Path, dict[str, torch.Tensor]]:
    """Save a random LyCORIS `variant` over deep copies of `components` to tmp_dir/<variant>.safetensors.

    Returns (path, expected): expected maps "<component>.<parameter name>" to the merged fp32 value implied by
    LyCORIS' forward pass at `multiplier`, for every parameter the network changes ({} for FILE_ONLY_ALGOS).
    """
    dim, alpha, args, _ = {**_VARIANTS, **_FILE_ONLY}[variant]
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_base_model_version": "sdxl_base_v1-0" if "text_encoder_2" in components else "sd_v1",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({k: str(v) for k, v in args.items()}),
    }
    path = Path(tmp_dir) / f"{variant}.safetensors"
    with one_thread():
        copies = {name: copy.deepcopy(module).float() for name, module in components.items()}
        network = _create(copies, variant, multiplier)
        _randomize(network.loras, seed)
        network.apply_to(copies.get("text_encoder"), copies["unet"], apply_text_encoder=True, apply_unet=True)
        network.eval().requires_grad_(False)
        network.save_weights(str(path), None, metadata)
        return path, ({} if variant in _FILE_ONLY else _expected(network, copies, components))
