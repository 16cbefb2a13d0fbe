"""Greedy layer-wise autoencoder pre-training (Hinton & Salakhutdinov 2006; Bengio et al. 2007).

Before the supervised training of a deep network, each hidden layer in turn learns to reconstruct its
own input: h_k = act(W_k h_{k-1} + b_k) is trained, with a throw-away linear decoder, to minimize
||decoder(h_k) - h_{k-1}||^2, on the representation the layers below it (already pre-trained, frozen)
produce. The weights start where they describe the data instead of at random, which helped deep
sigmoid networks train before ReLU, good initializations and normalization made it unnecessary.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from steadygrad.structure import describe

__all__ = ["pretrain_autoencoders"]


def _hidden_layers(model: nn.Module) -> list[tuple[nn.Linear, nn.Module]]:
    """(Linear, activation) pairs of a plain MLP: a model's own description (``steadygrad.structure``, as
    ``steadygrad.build`` networks give), or an nn.Sequential's consecutive children."""
    structure = describe(model)
    if structure is not None:
        if not structure.chain:
            raise ValueError(
                f"pretrain_autoencoders needs a plain MLP (kind='mlp', skip='none'); got {structure.label}."
            )
        return list(structure.chain)
    if isinstance(model, nn.Sequential):
        children = list(model.children())
        return [(layer, after) for layer, after in itertools.pairwise(children) if isinstance(layer, nn.Linear)]
    raise ValueError("pretrain_autoencoders takes a steadygrad.build MLP or an nn.Sequential of Linear + activation.")


def _relative_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the target's variance: reproducing a constant scores 1, not ~0. With plain
    MSE, sigmoid codes that collapse toward a constant would look perfectly reconstructed."""
    return F.mse_loss(reconstruction, target) / target.var().clamp(min=1e-12)


def pretrain_autoencoders(
    model: nn.Module,
    inputs: torch.Tensor,
    epochs: int = 5,
    lr: float = 1e-2,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Pre-train every hidden layer of ``model`` as an autoencoder, greedily from the input up.

    Each layer is trained with Adam for ``epochs`` passes over ``inputs`` (already mapped
    through the layers below), minimizing the reconstruction's mean squared error relative to the variance of
    what it reconstructs. Returns each layer's final relative reconstruction error (1 = no better than the mean).
    """
    pairs = _hidden_layers(model)
    errors = []
    representation = inputs.detach()
    for linear, activation in pairs:
        decoder = nn.Linear(linear.out_features, linear.in_features)
        params = [*linear.parameters(), *decoder.parameters()]
        # Adam: its steps do not scale with the loss, and the relative loss is large for low-variance codes
        optimizer = torch.optim.Adam(params, lr=lr)
        n = representation.shape[0]
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for index in order.split(batch_size):
                batch = representation[index]
                optimizer.zero_grad()
                loss = _relative_error(decoder(activation(linear(batch))), batch)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            errors.append(float(_relative_error(decoder(activation(linear(representation))), representation)))
            representation = activation(linear(representation))
    return errors
