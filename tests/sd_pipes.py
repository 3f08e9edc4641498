"""Shared SD1.5 test helpers for the diffusers adapter tests: a tiny random pipeline, its parameters by their
original names, a fixed forward pass and the relative-error check."""
from __future__ import annotations

import torch

from lora_compat.oracles.models import make_sd15_components


def sd15_pipe(seed: int = 100):
    from diffusers import StableDiffusionPipeline

    components = make_sd15_components(seed=seed)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=components["text_encoder"], tokenizer=None,
                                   unet=components["unet"], scheduler=None, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe, components


def base_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by their original names (PEFT wrappers' base_layer folded in, adapter tensors left out)."""
    return {n.replace(".base_layer", ""): p.detach() for n, p in module.named_parameters()
            if not any(s in n for s in (".lora_", ".hada_", ".lokr_"))}


def forward(components: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    unet, te = components["unet"], components["text_encoder"]
    with torch.no_grad():
        tokens = torch.randint(0, 1000, (1, 7), generator=g)
        hidden = te(tokens).last_hidden_state
        sample = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
        out = unet(sample, torch.tensor([10]), encoder_hidden_states=hidden).sample
    return hidden, out


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, rel
