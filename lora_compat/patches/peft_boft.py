"""PEFT BOFT (``peft.tuners.boft``): butterfly-factorised orthogonal rotation of the weight's *input*
columns, then a per-output-row scale: ``W' = diag(s) · W · Mᵀ`` with ``M = M_{m−1} ⋯ M_0`` and
``M_i = P_i · B_i · P_iᵀ``.

``boft_R [m, n_blocks, b, b]`` holds unconstrained blocks: ``B_i = blockdiag(cayley(½(R − Rᵀ)))`` with PEFT's
``(I − S)(I + S)⁻¹``; ``P_i`` is PEFT's ``block_butterfly_perm`` permutation; ``boft_s`` is ``[out, 1]``
(linear) or ``[1, out]`` (conv). This differs from LyCORIS BOFT (output rows, other permutation, exact
Cayley of the other sign), so it is its own kind. Everything follows ``BOFTLayer.get_delta_weight`` / ``merge``;
the dense ``in x in`` matrices PEFT builds are applied here as index permutations and block products.
"""
from __future__ import annotations

from typing import Mapping

from .._lazy import torch

from .base import Patch, Ref, Shape, Tensor, numel


def butterfly_perm(n: int, blocks: int, r: int, n_butterfly_factor: int) -> Tensor:
    """PEFT's ``BOFTLayer.block_butterfly_perm(n, b, r, n_butterfly_factor)``: ``perm[j]`` is the column
    that row ``j`` of the permutation matrix selects (``P[j, perm[j]] = 1``)."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    block_size = int(n // blocks)
    indices = torch.arange(n)
    step = block_size / r
    order = torch.arange(block_size)
    sorted_order = torch.empty(block_size, dtype=torch.long)
    for i, pos in enumerate(torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))):
        sorted_order[int(i * r):int(i * r + r)] = order[int(pos * r):int(pos * r + r)]
    for start in range(0, n, block_size):
        indices[start:start + block_size] = indices[start:start + block_size][sorted_order]
    return indices


def boft_blocks(raw: Tensor) -> Tensor:
    """``cayley_batch``: ``Q = (I − S)(I + S)⁻¹`` with ``S = ½(R − Rᵀ)``, for every stage and block."""
    m, n, b, _ = raw.shape
    flat = raw.reshape(m * n, b, b)
    skew = 0.5 * (flat - flat.transpose(1, 2))
    eye = torch.eye(b, dtype=raw.dtype).unsqueeze(0).expand(m * n, b, b)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).reshape(m, n, b, b)


class PeftBoftPatch(Patch):
    """``W' = diag(s) · W · Mᵀ``. PEFT has no strength for BOFT (``set_scale`` warns and keeps 1); here the
    strength interpolates the merged weight linearly, ``W + s·(W' − W)``, as lora_compat's OFT kinds do (for
    a rotation of the input columns that is the same as interpolating the rotation)."""

    kind = "peft_boft"
    written_as_diff = True

    def __init__(self, blocks: Ref, scale: Ref):
        if len(blocks.shape) != 4 or blocks.shape[2] != blocks.shape[3]:
            raise ValueError(f"boft_R {list(blocks.shape)} is not [stages, blocks, b, b]")
        self.blocks, self.scale = blocks, scale

    @property
    def rank(self) -> int:
        """Block size (BOFT's counterpart of a rank)."""
        return self.blocks.shape[-1]

    def refs(self) -> dict[str, Ref]:
        return {"boft_R": self.blocks, "boft_s": self.scale}

    def misfit(self, shapes: Mapping[str, Shape]) -> str | None:
        weight = shapes.get("weight")
        _, n, b, _ = self.blocks.shape
        if weight is None or len(weight) < 2:
            return "module has no matrix weight"
        if numel(weight[1:]) != n * b:
            return f"PEFT BOFT {n} blocks of {b} need {n * b} input columns, module weight is {list(weight)}"
        if numel(self.scale.shape) != weight[0]:
            return f"PEFT BOFT boft_s {list(self.scale.shape)} does not scale the {weight[0]} output rows"
        return None

    def merged(self, weight: Tensor) -> Tensor:
        """``diag(s) · W · Mᵀ`` in the weight's shape (strength 1)."""
        q = boft_blocks(self.blocks.load())
        stages, n, b, _ = q.shape
        x = weight.reshape(weight.shape[0], -1)
        columns = x.shape[1]
        for i in range(stages):
            perm = butterfly_perm(columns, int(n / (2 ** i)), int(b / 2), stages - 1)
            x = x[:, torch.argsort(perm)]  # x · P_i
            x = torch.einsum("okj,kcj->okc", x.reshape(x.shape[0], n, b), q[i]).reshape(x.shape)  # · B_iᵀ
            x = x[:, perm]  # · P_iᵀ
        return (x * self.scale.load().reshape(-1, 1)).reshape(weight.shape)

    def delta(self, base: Mapping[str, Tensor], strength: float = 1.0) -> dict[str, Tensor]:
        weight = base["weight"]
        return {"weight": (self.merged(weight) - weight) * strength}
