"""The doctor's data: the user's data (tensors, a Dataset, a DataLoader, any iterable of batches) as a list of
training batches and a list of held-out batches the trials never train on; learnable synthetic targets from a
fixed teacher when the user gives none.

A batch is ``Batch(inputs, targets)``: ``inputs`` is what the model is called with (a tensor, a tuple or list of
positional arguments, or a mapping of keywords such as a Hugging Face ``BatchEncoding``), ``targets`` the labels or
None (the model computes its own loss from ``labels`` in the mapping, or ``loss(output)`` needs none).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = ["Batch", "Split", "first_batch", "split_data", "teacher_targets"]

# held out: this fraction of the examples (or batches) given, at least one batch, at most MAX_HELD_OUT batches
HELD_OUT_FRACTION = 0.2
MAX_HELD_OUT = 4
MAX_TRAIN_BATCHES = 64  # taken from an iterable; the trials cycle through them
SEQUENCE_DECAY = 0.8  # the synthetic teacher's memory of a float sequence, per step


@dataclass
class Batch:
    inputs: object
    targets: torch.Tensor | None = None

    @property
    def size(self) -> int:
        first = _first_tensor(self.inputs)
        return int(first.shape[0]) if first is not None and first.dim() else 1


@dataclass
class Split:
    train: list[Batch]
    held_out: list[Batch]
    description: str  # in words, for the report: what was trained on and what was held out


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _rows(obj, index: torch.Tensor):
    """The rows ``index`` of every tensor in ``obj`` (same structure); non-tensors as they are."""
    if isinstance(obj, torch.Tensor):
        return obj[index]
    if isinstance(obj, Mapping):
        return {k: _rows(v, index) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_rows(v, index) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def as_batch(item) -> Batch:
    """One batch as a data loader yields it: a tensor (inputs only), a pair ``(inputs, targets)``, a 1-tuple, or a
    mapping (keywords for the model; Hugging Face batches carry their ``labels`` there)."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, (torch.Tensor, Mapping)):
        return Batch(item)
    if isinstance(item, (list, tuple)) and not hasattr(item, "_fields"):
        if len(item) == 1:
            return Batch(item[0])
        if len(item) == 2 and (item[1] is None or isinstance(item[1], torch.Tensor)):
            return Batch(item[0], item[1])
        raise ValueError(
            f"A batch of {len(item)} items is ambiguous: the doctor takes a tensor (inputs), a pair (inputs, "
            "targets), or a dict of keyword arguments (Hugging Face batches, labels included). Wrap several "
            "inputs as ((x1, x2), targets)."
        )
    raise ValueError(
        f"A batch must be a tensor, a pair (inputs, targets) or a dict of tensors; got {type(item).__name__}."
    )


def _split_rows(batch: Batch, batch_size: int, seed: int) -> Split:
    """One in-memory set of examples, shuffled once, cut into batches; the first ~20% of rows are held out."""
    n = batch.size
    if n < 4:
        raise ValueError(f"The doctor needs at least 4 examples (some to train on, some held out); got {n}.")
    if batch.targets is not None and len(batch.targets) != n:
        raise ValueError(f"targets has {len(batch.targets)} entries for {n} inputs.")
    batch_size = max(2, min(batch_size, n // 2))
    held = min(max(int(n * HELD_OUT_FRACTION), 2), MAX_HELD_OUT * batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def cut(index: torch.Tensor) -> list[Batch]:
        return [
            Batch(_rows(batch.inputs, i), None if batch.targets is None else batch.targets[i])
            for i in index.split(batch_size)
            if len(i) >= 2
        ]

    train, held_out = cut(order[held:]), cut(order[:held])
    return Split(
        train,
        held_out,
        f"{n - held} examples in {len(train)} batches of {batch_size} to train on; {held} held out",
    )


def _in_memory(data) -> bool:
    """One set of rows: a tensor, a mapping of tensors, a ``Batch``, or a pair of tensors."""
    return isinstance(data, (torch.Tensor, Mapping, Batch)) or (
        isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, torch.Tensor) or d is None for d in data)
    )


def _batches(data, batch_size: int, seed: int) -> Iterator[Batch]:
    """The batches of a ``Dataset`` (batched here, shuffled with ``seed``), a ``DataLoader`` or any iterable."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        if len(data) == 0:
            return iter(())
        data = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    elif isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size)
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(
            f"data must be a tensor, (inputs, targets), a dict of tensors, a Dataset, a DataLoader or an iterable "
            f"of batches; got {type(data).__name__}."
        )
    return (as_batch(item) for item in data)


def first_batch(data, batch_size: int = 64, seed: int = 0) -> Batch | None:
    """The first batch of ``data`` in any form ``split_data`` takes (in-memory rows whole); None when it has none."""
    return as_batch(data) if _in_memory(data) else next(_batches(data, batch_size, seed), None)


def split_data(data, batch_size: int = 32, seed: int = 0) -> Split:
    """The user's ``data`` as training and held-out batches.

    ``data`` is a tensor of inputs, a pair ``(inputs, targets)`` of tensors, a mapping of tensors (one HF batch of
    many rows), a ``torch.utils.data.Dataset`` (batched here, shuffled with ``seed``), or a ``DataLoader`` or any
    other iterable of batches (taken in order, up to ``MAX_TRAIN_BATCHES`` plus the held-out ones: the last
    ~20%, at least one). One in-memory set of rows is shuffled once and cut into batches of ``batch_size``.
    """
    if _in_memory(data):
        return _split_rows(as_batch(data), batch_size, seed)
    taken = list(itertools.islice(_batches(data, batch_size, seed), MAX_TRAIN_BATCHES + MAX_HELD_OUT))
    if not taken:
        raise ValueError("The data yielded no batch: the doctor needs batches to train on and to hold out.")
    if len(taken) == 1:  # one batch: split its rows
        return _split_rows(taken[0], batch_size, seed)
    held = min(max(1, round(len(taken) * HELD_OUT_FRACTION)), MAX_HELD_OUT)
    train, held_out = taken[:-held], taken[-held:]
    return Split(
        train,
        held_out,
        f"{len(train)} batches of the data to train on; the next {len(held_out)} held out",
    )


# -- synthetic targets ------------------------------------------------------------------------------------------


def _token_ids(inputs) -> torch.Tensor | None:
    if isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), torch.Tensor):
        return inputs["input_ids"]
    first = _first_tensor(inputs)
    return first if first is not None and not first.is_floating_point() and not first.is_complex() else None


class Teacher:
    """A fixed random function of the inputs whose outputs are the targets: learnable by construction, unlike
    random labels, so a held-out loss can fall and a fix that helps learning shows it.

    - float sequences (N, T, F): the same network on sum_t 0.8^(T-t) x_t, a fading memory a recurrence can
      learn (the flattened sequence would need the whole past at once);
    - float images (N, C, H, ...): the same network on each channel's mean and RMS over the positions, which a
      convolutional network with a global pooling can compute;
    - other float inputs: a random two-layer tanh network on the flattened input (h = tanh(x W1 / sqrt(d)), logits =
      h W2), its argmax for classification and its (standardized) outputs for regression;
    - token ids with one output per position (a language model, logits (N, T, V)): the target at position t is
      a fixed random permutation of x_t, which a few dozen steps can learn through the whole stack;
    - token ids with one output per sequence: the argmax of a random linear map of the mean of random token
      embeddings.
    """

    def __init__(self, inputs, output_shape: tuple[int, ...], task: str, seed: int):
        self.task = task
        self.output_shape = output_shape  # without the batch dimension
        self.g = torch.Generator().manual_seed(seed + 7919)
        self.tokens = _token_ids(inputs) is not None
        self.classes = output_shape[-1] if output_shape else 1
        self._weights: dict[str, torch.Tensor] = {}

    def _weight(self, name: str, *shape: int) -> torch.Tensor:
        if name not in self._weights:
            self._weights[name] = torch.randn(*shape, generator=self.g)
        return self._weights[name]

    def __call__(self, inputs) -> torch.Tensor:
        if self.tokens:
            ids = _token_ids(inputs).long()
            vocab = 1 << max(1, math.ceil(math.log2(int(ids.max()) + 1)))  # stable across batches
            if ids.dim() == 2 and len(self.output_shape) == 2:  # per position
                table = self._weight("table", 4096).argsort()  # a fixed permutation
                return (table[ids % min(vocab, 4096)] % self.classes).long()
            embed = self._weight("embed", 4096, 16)
            pooled = embed[ids.reshape(ids.shape[0], -1) % 4096].mean(1)
            return (pooled @ self._weight("head", 16, self.classes)).argmax(1)
        x = _first_tensor(inputs).float()
        if x.dim() == 3:  # (N, T, F) sequences: what a recurrence can carry, a decaying sum over time
            decay = SEQUENCE_DECAY ** torch.arange(x.shape[1] - 1, -1, -1, dtype=x.dtype)
            x = (x * decay[None, :, None]).sum(1) * math.sqrt(1 - SEQUENCE_DECAY**2)
        elif x.dim() >= 4:  # (N, C, H, W...) images: what a convolution and a global pooling can compute
            spatial = tuple(range(2, x.dim()))
            x = torch.cat([x.mean(spatial), x.pow(2).mean(spatial).sqrt()], 1)
        flat = x.reshape(x.shape[0], -1)
        flat = (flat - flat.mean(0)) / flat.std(0).clamp(min=1e-6) if x.shape[0] > 1 else flat
        hidden = torch.tanh(flat @ self._weight("w1", flat.shape[1], 64) / math.sqrt(flat.shape[1]))
        out = hidden @ self._weight("w2", 64, self.classes) / 8.0
        if self.task == "classification":
            return out.argmax(1)
        return (out / out.std().clamp(min=1e-6)).reshape(x.shape[0], *self.output_shape)


def teacher_targets(split: Split, output, task: str | None, seed: int) -> tuple[Split, str]:
    """``split`` with every batch's targets made by one ``Teacher``; the task it chose, in words."""
    from steadygrad.losses import tensors

    logits = getattr(output, "logits", None)
    out = logits if isinstance(logits, torch.Tensor) else next(iter(tensors(output)), None)
    if out is None:
        raise ValueError("The model's output holds no tensor: give loss= or targets.")
    shape = tuple(out.shape[1:])
    if task is None:
        task = "classification" if shape and shape[-1] > 1 else "regression"
    teacher = Teacher(split.train[0].inputs, shape, task, seed)
    batches = [[Batch(b.inputs, teacher(b.inputs)) for b in part] for part in (split.train, split.held_out)]
    kind = "token" if teacher.tokens else "input"
    words = f"synthetic {task} targets from a fixed random teacher of the {kind}s (learnable; not random labels)"
    return Split(batches[0], batches[1], split.description), words
