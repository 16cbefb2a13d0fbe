"""Causal multi-head self-attention built so the instruments can see inside it.

    attn = CausalSelfAttention(width=128, heads=4, qk_norm=True)
    y = attn(x)                      # x: (N, T, 128) -> (N, T, 128)

For head h, with q = x W_q, k = x W_k, v = x W_v split into ``heads`` slices of ``head_dim = width / heads``:

    logits_h = scale * q_h k_h^T  (future positions masked to -inf),   P_h = softmax(logits_h),
    y = concat_h(P_h v_h) W_o

(Vaswani et al. 2017), with ``scale = head_dim ** -0.5`` by default (μP uses ``1 / head_dim``, Yang et al.
2021). The softmax is its own child module, :class:`AttentionSoftmax`, whose input is the masked logits and
whose output is the attention probabilities: a forward hook on it is all the probe needs to read the attention
entropy per head and the largest logit, the quantities whose collapse and growth Zhai et al. (2023) and
Dehghani et al. (2023) tie to unstable training. Torch's fused ``scaled_dot_product_attention`` never
materializes P, so this block computes it explicitly; that is the price of measuring it.

``qk_norm=True`` normalizes every head's queries and keys over ``head_dim`` before the product (Dehghani et
al. 2023, "Scaling Vision Transformers to 22B Parameters"), which bounds the logits by ``scale * head_dim`` times
the norms' gains.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from steadygrad.norm import LayerNorm, RMSNorm

__all__ = ["AttentionSoftmax", "CausalSelfAttention", "attention_entropy"]

QK_NORMS = ("layer", "rms")


class AttentionSoftmax(nn.Module):
    """softmax over the last axis: logits (N, H, T, S) in, attention probabilities out.

    A module of its own so that hooks see both: the input is the (masked) logits, the output the rows of P.
    """

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Each attention row's Shannon entropy, -sum_j P_ij log P_ij in nats, over the last axis (0 log 0 = 0).

    Shape (..., T, S) -> (..., T). A row that attends to one key has entropy 0; a uniform row over s keys has
    log s, the most it can have.
    """
    logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
    return -(probs * logs).sum(-1)


def causal_mask(length: int, device=None) -> torch.Tensor:
    """(T, T) bool, True where key j is in query i's future (j > i): the positions a causal model masks."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``.

    The same function as ``nn.MultiheadAttention(width, heads, batch_first=True)`` called with a causal
    ``attn_mask`` (the tests load one's weights into the other and compare outputs and per-head probabilities),
    laid out as Hugging Face's Llama and GPT-NeoX blocks are, so each projection is a layer of its own.

    Args:
        width: the model width (embedding size); must be divisible by ``heads``.
        heads: number of attention heads.
        bias: biases in the four projections.
        qk_norm: None/False for none, True or "layer" for layer norm, "rms" for RMS norm of q and k over
            ``head_dim`` (one norm shared by the heads, as in Dehghani et al. 2023).
        scale: the logits' multiplier; None is ``head_dim ** -0.5``.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        bias: bool = True,
        qk_norm: bool | str | None = False,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"CausalSelfAttention: heads ({heads}) must be positive and divide width ({width}).")
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.scale = self.head_dim**-0.5 if scale is None else float(scale)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            self.add_module(name, nn.Linear(width, width, bias=bias))
        norm = "layer" if qk_norm is True else (qk_norm or None)
        if norm is not None and norm not in QK_NORMS:
            raise ValueError(f"CausalSelfAttention: qk_norm must be False, True, 'layer' or 'rms'; got {qk_norm!r}.")
        self.qk_norm = norm
        if norm is not None:
            make = (lambda: LayerNorm(self.head_dim)) if norm == "layer" else (lambda: RMSNorm(self.head_dim))
            self.q_norm, self.k_norm = make(), make()
        self.softmax = AttentionSoftmax()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, length, _ = t.shape
        return t.view(n, length, self.heads, self.head_dim).transpose(1, 2)  # (N, H, T, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(f"CausalSelfAttention takes (batch, sequence, {self.width}); got shape {tuple(x.shape)}.")
        n, length, _ = x.shape
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        logits = logits.masked_fill(causal_mask(length, x.device), -math.inf)
        probs = self.softmax(logits)
        out = (probs @ v).transpose(1, 2).reshape(n, length, self.width)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return f"width={self.width}, heads={self.heads}, qk_norm={self.qk_norm}, scale={self.scale:.4g}"
