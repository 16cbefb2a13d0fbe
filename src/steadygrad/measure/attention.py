"""What attention did on a pass: per attention layer, the entropy of its rows per head and its largest logit.

For an attention layer with probabilities P (batch, heads, queries, keys) and logits z:

    H_h = mean over (batch, query) of  -sum_j P_ij log P_ij        (nats, one value per head h)
    attn_entropy = mean_h H_h,   attn_entropy_min = min_h H_h,   attn_max_logit = max of the finite z
    attn_entropy_fraction = mean over heads and rows of H_row / log(keys the row may attend to)

The fraction is what a rule can compare across models: 1 is uniform attention, 0 every row on one key, whatever
the sequence length (rows with a single allowed key, a causal model's first position, are left out of it).

Zhai et al. (2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse") tie divergence
to the collapse of H towards 0, and Dehghani et al. (2023) to the growth of the logits that drives it. The
probabilities are read wherever they are computed in eager form:

- steadygrad's ``CausalSelfAttention``: its ``AttentionSoftmax`` child's input (logits) and output (P);
- ``nn.MultiheadAttention``: asked for per-head weights on measured passes (the caller's own return value is
  rebuilt as they asked for it); no logits, so no largest logit;
- Hugging Face attention modules (a class whose name ends in ``Attention`` that returns per-head weights as
  its second output, as HF models' eager attention does; a second output that is not rows of probabilities,
  such as T5's position bias, is not read); no logits either. Under attention dropout in training the weights
  read are the dropped ones (the probe turns dropout off).

Under fused attention (SDPA, flash) the probabilities never exist: the layer is listed as not measured,
which the report says, rather than a number that was never taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from steadygrad._autograd import in_backward
from steadygrad.attention import AttentionSoftmax, attention_entropy

__all__ = ["AttentionStats", "AttentionTap", "attention_sites"]


@dataclass
class AttentionStats:
    """One attention layer's measurement over the passes of a step (per-head entropies averaged over passes)."""

    entropy_per_head: list[float]
    fraction_per_head: list[float]  # entropy / its most (uniform over the allowed keys), per head
    max_logit: float = math.nan

    @property
    def fraction(self) -> float:
        return sum(self.fraction_per_head) / len(self.fraction_per_head)

    @property
    def entropy(self) -> float:
        return sum(self.entropy_per_head) / len(self.entropy_per_head)

    @property
    def entropy_min(self) -> float:
        return min(self.entropy_per_head)


def _is_hf_attention(module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") and type(module).__module__.startswith("transformers.")


def attention_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention layers whose probabilities can be read: (name, the module that computes them). Of nested HF
    attention classes (BERT's ``BertAttention`` around ``BertSelfAttention``, T5's ``T5LayerSelfAttention`` around
    ``T5Attention``) the innermost is the one that computes the weights."""
    named = list(model.named_modules())
    hf = [name for name, module in named if _is_hf_attention(module)]

    def innermost_hf(name: str, module: nn.Module) -> bool:
        return _is_hf_attention(module) and not any(inner.startswith(name + ".") for inner in hf)

    return [
        (name, module)
        for name, module in named
        if isinstance(module, (AttentionSoftmax, nn.MultiheadAttention)) or innermost_hf(name, module)
    ]


def _looks_like_probabilities(weights) -> bool:
    """A (N, H, T, S) tensor of non-negative rows summing to 1 on average (attention dropout rescales single rows,
    not the mean): HF attention's second output is that only when it returns the weights; T5's returns its
    position bias there instead, which must not be read as attention."""
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4 or not weights.is_floating_point():
        return False
    weights = weights.detach()
    smallest, row_sum = torch.stack([weights.min().double(), weights.sum(-1).double().mean()]).tolist()  # one sync
    return smallest >= 0 and abs(row_sum - 1.0) < 0.1


def _per_head_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(N, H, T, S) probabilities -> (2, H): per head, the mean row entropy in float64, and the mean over rows with
    two or more keys to choose from of the entropy as a fraction of that row's most, log(keys with P > 0)."""
    probs = probs.detach().double()
    entropy = attention_entropy(probs)
    keys = (probs > 0).sum(-1)
    choice = keys >= 2  # a row with one allowed key (a causal model's first position) has no choice to collapse
    fraction = torch.where(choice, entropy / keys.clamp_min(2).double().log(), torch.zeros_like(entropy))
    dims = tuple(d for d in range(entropy.dim()) if d != 1)
    rows = choice.sum(dim=dims).clamp_min(1)
    return torch.stack([entropy.mean(dim=dims), fraction.sum(dim=dims) / rows])


class AttentionTap:
    """Hooks on a model's attention layers, collecting ``AttentionStats`` on armed passes only, keyed by the
    attention layer's name (``layer_name``: the ``CausalSelfAttention`` that owns an ``AttentionSoftmax``)."""

    def __init__(self, model: nn.Module, armed: Callable[[], bool] = lambda: True) -> None:
        self.sites = attention_sites(model)
        self._armed = armed  # whether this pass is measured (the Monitor's logged, unpaused passes)
        self._handles: list = []
        # name -> [(entropy, fraction) sums per head, passes, largest logit as a tensor: no host sync per pass]
        self._sums: dict[str, list] = {}
        self._asked: dict[int, tuple[bool, bool] | None] = {}  # per nn.MultiheadAttention: the caller's weights form
        self.unmeasured: set[str] = set()

    @staticmethod
    def layer_name(name: str, module: nn.Module) -> str:
        """The attention layer a site belongs to: the softmax's parent, or the module itself."""
        return name.rsplit(".", 1)[0] if isinstance(module, AttentionSoftmax) and "." in name else name

    def attach(self) -> None:
        for name, module in self.sites:
            layer = self.layer_name(name, module)
            if isinstance(module, nn.MultiheadAttention):
                self._handles.append(module.register_forward_pre_hook(self._ask_for_weights, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._hook(layer, module), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self._sums.clear()
        self.unmeasured.clear()

    def _ask_for_weights(self, module, args, kwargs):
        if not self._measuring():
            return None
        if len(args) > 4:  # need_weights given positionally: the call is left as it is, and not measured
            self._asked[id(module)] = None
            return None
        # what the caller asked for, so that the forward hook returns it in that form
        self._asked[id(module)] = (kwargs.get("need_weights", True), kwargs.get("average_attn_weights", True))
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def _measuring(self) -> bool:
        return self._armed() and not in_backward()  # a checkpointed layer's recomputation is not a second pass

    def _add(self, layer: str, probs: torch.Tensor, logits: torch.Tensor | None) -> None:
        heads = _per_head_entropy(probs)
        sums = self._sums.setdefault(layer, [torch.zeros_like(heads), 0, None])
        sums[0] += heads
        sums[1] += 1
        if logits is not None:
            logits = logits.detach()
            largest = torch.where(torch.isfinite(logits), logits, -math.inf).amax().double()
            sums[2] = largest if sums[2] is None else torch.maximum(sums[2], largest)

    def _hook(self, layer: str, module: nn.Module):
        def hook(mod, args, kwargs, output):
            if not self._measuring():
                return None
            if isinstance(mod, AttentionSoftmax):
                logits = args[0] if args else kwargs.get("logits")
                self._add(layer, output, logits)
                return None
            if isinstance(mod, nn.MultiheadAttention):
                asked = self._asked.pop(id(mod), None)
                attn_output, weights = output
                if asked is None or weights is None:
                    self.unmeasured.add(layer)
                    return None
                need, average = asked
                self._add(layer, weights if weights.dim() == 4 else weights.unsqueeze(0), None)
                if not need:
                    return attn_output, None
                return (attn_output, weights.mean(dim=1) if average else weights)
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if _looks_like_probabilities(weights):
                self._add(layer, weights, None)
            else:
                self.unmeasured.add(layer)
            return None

        return hook

    def stats(self) -> dict[str, AttentionStats]:
        """Per attention layer measured since the last reset."""
        out = {}
        for layer, (heads, passes, largest) in self._sums.items():
            entropy, fraction = (values / passes for values in heads)
            max_logit = float(largest) if largest is not None else math.nan
            out[layer] = AttentionStats(
                entropy.tolist(), fraction.tolist(), max_logit if max_logit > -math.inf else math.nan
            )
        return out
