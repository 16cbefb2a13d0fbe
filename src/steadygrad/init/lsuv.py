"""LSUV: layer-sequential unit-variance initialization (Mishkin & Matas 2016, "All you need is a good init").

1. Orthogonal weights (Saxe et al. 2014).
2. Layer by layer, in order: run a batch, and divide the layer's weights by the standard deviation of its
   output until that is 1 within ``tolerance``.

Data-driven: it fixes whatever scale the architecture's activations and skips leave, without
normalization layers at training time.
"""

from __future__ import annotations

import torch
from torch import nn

from steadygrad import kinds
from steadygrad.init.schemes import orthogonal_

__all__ = ["lsuv_"]


@torch.no_grad()
def lsuv_(
    model: nn.Module,
    inputs: torch.Tensor,
    tolerance: float = 0.05,
    max_iterations: int = 10,
    generator: torch.Generator | None = None,
) -> list[float]:
    """LSUV-initialize every Linear and convolution of ``model`` in place, using ``inputs``.

    Returns:
        The output std of each layer after its last rescaling (1 within ``tolerance`` unless
        ``max_iterations`` ran out, or the output is constant).
    """
    layers = [m for m in model.modules() if kinds.is_weight_layer(m, *kinds.AFFINE)]
    if not layers:
        raise ValueError("lsuv_ found no Linear or convolution layer in the model.")
    if inputs.shape[0] < 2:
        raise ValueError(
            f"lsuv_ needs a batch of at least 2 examples to measure a variance; got {tuple(inputs.shape)}."
        )
    was_training = model.training
    model.eval()  # batch norm (if any) should not move its running statistics here
    stds = []
    try:
        for layer in layers:
            orthogonal_(layer.weight, generator=generator)
            if layer.bias is not None:
                layer.bias.zero_()
            captured: dict[str, torch.Tensor] = {}

            def keep_output(module, args, output, captured=captured):
                captured["y"] = output

            handle = layer.register_forward_hook(keep_output)
            try:
                for _ in range(max_iterations):
                    model(inputs)
                    std = float(captured["y"].std())
                    if std == 0 or abs(std - 1.0) <= tolerance:
                        break
                    layer.weight.div_(std)
            finally:
                handle.remove()
            stds.append(std)
    finally:
        model.train(was_training)
    return stds
