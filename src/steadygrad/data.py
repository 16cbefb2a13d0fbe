"""Data to train on, with no download: scikit-learn's bundled digits, generated sets, and the user's files.

Every loader returns a ``Dataset``: a train/test split, standardized with the training split's
statistics by default (``standardize=False`` keeps the raw scale, e.g. the all-positive digit pixels
for the zero-centring experiment of LeCun et al. 1998).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from steadygrad._checks import check_choice

__all__ = [
    "BUILTIN",
    "IGNORE_INDEX",
    "SEQUENCE_TASKS",
    "TOKEN_SETS",
    "DataError",
    "Dataset",
    "SequenceTask",
    "blobs",
    "char_tokens",
    "digits",
    "from_file",
    "load",
    "next_token_windows",
    "python_source_text",
    "sequence_task",
    "teacher_student",
    "token_dataset",
    "two_spirals",
]

TASKS = ("classification", "regression")


class DataError(ValueError):
    """A data file or data option that cannot be used: the message says why and what is accepted."""


@dataclass
class Dataset:
    """Inputs and targets, split into train and test. Classification targets are int64 class indices."""

    name: str
    x_train: torch.Tensor  # (N, features) float32
    y_train: torch.Tensor  # (N,) int64 classes or (N,) / (N, k) float32 targets
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str  # "classification" or "regression"
    num_classes: int | None = None
    image_shape: tuple[int, ...] | None = None  # (C, H, W) when the features are an image's pixels
    standardized: bool = True
    feature_mean: torch.Tensor | None = field(default=None, repr=False)  # the training split's statistics
    feature_std: torch.Tensor | None = field(default=None, repr=False)
    tokens: bool = False  # int64 token rows (N, T) with next-token targets (N, T), -100 where not scored

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def out_features(self) -> int:
        if self.task == "classification":
            return int(self.num_classes)
        return 1 if self.y_train.dim() == 1 else self.y_train.shape[1]

    def inputs_for(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Shape flat features for a network kind: mlp (N, F); cnn (N, C, H, W) for image data; rnn
        (N, T, F'): an image's rows as time steps, else one feature per step. Token rows are for kind
        transformer only, and features never are."""
        if self.tokens != (kind == "transformer"):
            if self.tokens:
                raise DataError(
                    f"{self.name} is token sequences, for kind='transformer'; got kind={kind!r}. Use --kind "
                    "transformer, or a feature or image set (digits, spirals, blobs, teacher, a file)."
                )
            raise DataError(
                f"kind='transformer' reads token sequences; {self.name} is features. Use a token set: "
                f"{', '.join(TOKEN_SETS)}."
            )
        if kind == "cnn":
            if self.image_shape is None:
                raise DataError(f"kind='cnn' needs image data; {self.name} has flat features. Use kind='mlp'.")
            return x.reshape(x.shape[0], *self.image_shape)
        if kind == "rnn":
            if self.image_shape is not None:
                _, height, _ = self.image_shape
                return x.reshape(x.shape[0], height, -1)
            return x.reshape(x.shape[0], -1, 1)
        return x

    def spec_sizes(self, kind: str) -> dict:
        """``in_features`` (and ``seq_len``/``image_size``) a NetSpec of ``kind`` needs for this data; for token
        rows their ``vocab`` and ``seq_len``."""
        self.inputs_for(kind, self.x_train[:1])  # raises when the kind cannot read this data
        if kind == "transformer":
            return {"vocab": int(self.num_classes), "seq_len": self.x_train.shape[1]}
        if kind == "cnn":
            channels, height, _ = self.inputs_for("cnn", self.x_train[:1]).shape[1:]
            return {"in_features": channels, "image_size": height, "out_features": self.out_features}
        if kind == "rnn":
            _, steps, features = self.inputs_for("rnn", self.x_train[:1]).shape
            return {"in_features": features, "seq_len": steps, "out_features": self.out_features}
        return {"in_features": self.in_features, "out_features": self.out_features}


def _split(name: str, x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    """(x_train, y_train, x_test, y_test): the rows in a seeded random order, the first ``test_fraction`` held out."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive); got {test_fraction!r}.")
    n = len(x)
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 2:
        raise DataError(f"{name} has {n} examples: too few to hold out {n_test} for testing and still train.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _split_and_scale(name, x, y, task, test_fraction, standardize, seed, num_classes=None, image_shape=None):
    y = torch.as_tensor(y)
    y = y.long() if task == "classification" else y.float()
    x_train, y_train, x_test, y_test = _split(name, torch.as_tensor(x, dtype=torch.float32), y, test_fraction, seed)
    mean = std = None
    if standardize:
        mean = x_train.mean(0)
        std = x_train.std(0)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant features stay, shifted to 0
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Dataset(name, x_train, y_train, x_test, y_test, task, num_classes, image_shape, standardize, mean, std)


def digits(test_fraction: float = 0.2, standardize: bool = True, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten digits (8 x 8 pixels, values 0-16, 10 classes), bundled with it."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _split_and_scale(
        "digits",
        bunch.data,
        bunch.target,
        "classification",
        test_fraction,
        standardize,
        seed,
        num_classes=10,
        image_shape=(1, 8, 8),
    )


def two_spirals(
    n: int = 1000, noise: float = 0.2, test_fraction: float = 0.2, standardize: bool = True, seed: int = 0
) -> Dataset:
    """Two interleaved spirals in the plane (Lang & Witbrock 1988): 2 classes, hard for shallow nets."""
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    t = torch.sqrt(torch.rand(half, generator=g)) * 3 * math.pi
    arm = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    x = torch.cat([arm, -arm]) + noise * torch.randn(2 * half, 2, generator=g)
    y = torch.cat([torch.zeros(half), torch.ones(half)]).long()
    return _split_and_scale("spirals", x, y, "classification", test_fraction, standardize, seed, num_classes=2)


def blobs(
    n: int = 1000,
    centers: int = 4,
    dim: int = 2,
    spread: float = 1.0,
    test_fraction: float = 0.2,
    standardize: bool = True,
    seed: int = 0,
) -> Dataset:
    """Gaussian blobs: ``centers`` classes around random centres in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    middles = torch.randn(centers, dim, generator=g) * 4
    y = torch.randint(0, centers, (n,), generator=g)
    x = middles[y] + spread * torch.randn(n, dim, generator=g)
    return _split_and_scale("blobs", x, y, "classification", test_fraction, standardize, seed, num_classes=centers)


def teacher_student(
    n: int = 2000,
    dim: int = 20,
    hidden: int = 32,
    noise: float = 0.1,
    test_fraction: float = 0.2,
    standardize: bool = True,
    seed: int = 0,
) -> Dataset:
    """Regression on the outputs of a random two-layer tanh "teacher" network, plus Gaussian noise: a
    target a student network of enough capacity can learn exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, hidden, generator=g) / math.sqrt(dim)
    w2 = torch.randn(hidden, generator=g) / math.sqrt(hidden)
    y = torch.tanh(x @ w1 * 1.5) @ w2 + noise * torch.randn(n, generator=g)
    return _split_and_scale("teacher", x, y, "regression", test_fraction, standardize, seed)


BUILTIN = {"digits": digits, "spirals": two_spirals, "blobs": blobs, "teacher": teacher_student}
# token sets for kind transformer (``token_dataset``): the synthetic tasks and the standard library's source text
TOKEN_SETS = ("copy", "reverse", "recall", "pysource")


def _infer_task(y: np.ndarray) -> str:
    if np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        return "classification"
    return "regression"


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 2:
        raise DataError(f"{path} has no data rows: a CSV needs a header line and at least one row.")
    header = [h.strip() for h in rows[0]]
    if target is None:
        raise DataError(
            f"Name the target column of {path} (e.g. --target {header[-1]}); its columns: {', '.join(header)}."
        )
    if target not in header:
        raise DataError(f"{path} has no column {target!r}; its columns: {', '.join(header)}.")
    column = header.index(target)
    values = np.empty((len(rows) - 1, len(header)))
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {i}: {len(row)} values where the header has {len(header)}.")
        for j, cell in enumerate(row):
            try:
                values[i - 2, j] = float(cell)
            except ValueError:
                raise DataError(
                    f"{path}, line {i}, column {header[j]!r}: {cell!r} is not a number. "
                    "Encode categories as numbers first."
                ) from None
    y = values[:, column]
    x = np.delete(values, column, axis=1)
    if np.all(y == np.round(y)) and len(np.unique(y)) <= max(2, len(y) // 5):
        y = y.astype(np.int64)  # whole numbers with few distinct values: class labels
    return x, y


def from_file(
    path: str | Path,
    target: str | None = None,
    task: str | None = None,
    test_fraction: float = 0.2,
    standardize: bool = True,
    seed: int = 0,
) -> Dataset:
    """The user's own data: ``.npz`` with arrays ``X`` (N, features) and ``y`` (N,) or ``.csv`` with a
    header line and a ``target`` column. The task is classification for integer labels (0 .. C-1), else
    regression, unless ``task`` says otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"No data file at {path}. Give a .npz (arrays X, y) or .csv file, or a built-in set: {', '.join(BUILTIN)}."
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise DataError(f"{path} is not a readable .npz archive ({error}).") from None
        keys = {k.lower(): k for k in archive.files}
        if "x" not in keys or "y" not in keys:
            raise DataError(f"{path} must hold arrays named X and y; it holds {', '.join(archive.files) or 'none'}.")
        x, y = archive[keys["x"]], archive[keys["y"]]
    elif suffix == ".csv":
        x, y = _read_csv(path, target)
    else:
        raise DataError(f"{path}: unknown data format {suffix or '(none)'}; accepted: .npz (arrays X, y), .csv.")
    if x.ndim != 2:
        raise DataError(f"X in {path} must be 2-D (examples, features); got shape {x.shape}.")
    if y.ndim not in (1, 2) or len(y) != len(x):
        raise DataError(f"y in {path} must have one entry per row of X ({len(x)}); got shape {y.shape}.")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"X in {path} must be numeric; got dtype {x.dtype}.")
    bad = ~np.isfinite(x.astype(np.float64))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"X in {path} has {int(bad.sum())} NaN or infinite values (first at row {row}, column "
            f"{col}). Impute or drop them first."
        )
    task = _infer_task(y) if task is None else check_choice("task", task, TASKS)
    num_classes = None
    if task == "classification":
        if y.ndim != 1 or not np.all(np.asarray(y) == np.round(np.asarray(y, dtype=np.float64))):
            raise DataError(f"Class labels in {path} must be whole numbers 0 .. C-1 in a 1-D y.")
        y = np.asarray(y, dtype=np.int64)
        if y.min() < 0:
            raise DataError(
                f"Class labels in {path} must be 0 .. C-1; found {int(y.min())}. Map them to 0 .. C-1 first."
            )
        num_classes = int(y.max()) + 1
        if num_classes < 2:
            raise DataError(f"{path} has a single class (0): classification needs at least two.")
    elif not np.all(np.isfinite(np.asarray(y, dtype=np.float64))):
        raise DataError(f"Targets y in {path} contain NaN or infinite values.")
    return _split_and_scale(
        path.stem, x.astype(np.float32), y, task, test_fraction, standardize, seed, num_classes=num_classes
    )


def load(
    source: str,
    target: str | None = None,
    test_fraction: float = 0.2,
    standardize: bool = True,
    seed: int = 0,
) -> Dataset:
    """A built-in set by name (``digits``, ``spirals``, ``blobs``, ``teacher``; for kind transformer the token
    sets ``copy``, ``reverse``, ``recall``, ``pysource``: ``token_dataset``) or a file path."""
    if source in TOKEN_SETS:
        return token_dataset(source, test_fraction=test_fraction, seed=seed)
    if source in BUILTIN:
        return BUILTIN[source](test_fraction=test_fraction, standardize=standardize, seed=seed)
    return from_file(source, target=target, test_fraction=test_fraction, standardize=standardize, seed=seed)


def python_source_text(max_chars: int = 200_000, seed: int = 0) -> str:
    """Text that ships with every Python: the standard library's own ``.py`` sources, read at run time.

    Files are taken in a seeded order (so runs are reproducible and not always the same few modules) until
    ``max_chars`` characters are read; non-ASCII characters are dropped, so the vocabulary is at most 128.
    """
    import random
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise DataError(f"No Python sources found under {root}; the character-level text needs them.")
    random.Random(seed).shuffle(files)
    parts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="ignore").encode("ascii", "ignore").decode()
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def char_tokens(text: str) -> tuple[torch.Tensor, int]:
    """A character-level encoding: (int64 token ids, vocabulary size = 128 for ASCII text)."""
    ids = torch.frombuffer(bytearray(text.encode("ascii", "ignore")), dtype=torch.uint8).long()
    return ids, 128


# --- synthetic sequence tasks for causal language models ---------------------------------------------------

SEQUENCE_TASKS = ("copy", "reverse", "recall")
IGNORE_INDEX = -100  # equal to steadygrad.losses.IGNORE_INDEX (a sibling layer, so not imported): not scored


@dataclass(frozen=True, eq=False)
class SequenceTask:
    """Token rows for next-token prediction: a model reads ``inputs`` and is scored on ``targets``.

    ``targets[i, t]`` is the token that should follow ``inputs[i, :t + 1]``, or ``IGNORE_INDEX`` (-100)
    where nothing is scored, so ``task_loss(model(inputs), targets)`` is the cross-entropy of the scored
    positions only. ``vocab`` counts every id, the reserved one included (``NetSpec(vocab=...)``).
    """

    name: str
    inputs: torch.Tensor  # (N, T) int64 token ids below vocab
    targets: torch.Tensor  # (N, T) int64: the next token where scored, else IGNORE_INDEX
    vocab: int
    seq_len: int

    @property
    def scored(self) -> torch.Tensor:
        """(N, T) bool: the positions the loss counts."""
        return self.targets != IGNORE_INDEX

    def batch(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` rows drawn uniformly at random (with replacement): (inputs, targets), each (B, T)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a whole number >= 1; got {batch_size!r}.")
        rows = torch.randint(0, len(self.inputs), (batch_size,), generator=generator)
        return self.inputs[rows], self.targets[rows]

    def __str__(self) -> str:
        n = len(self.inputs)
        per_row = int(self.scored.sum()) / n
        return (
            f"SequenceTask {self.name}: {n} sequences x {self.seq_len} tokens, vocab {self.vocab}, "
            f"{per_row:g} scored position{'s' if per_row != 1 else ''} per row"
        )

    __repr__ = __str__


def _check_whole(what: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise DataError(f"{what} must be a whole number >= {least}; got {value!r}.")
    return value


def _copy_rows(content: torch.Tensor, separator: int, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = content.shape
    second = content.flip(1) if reverse else content
    row = torch.cat([content, torch.full((n, 1), separator), second], 1)  # (N, 2k + 1)
    inputs, targets = row[:, :-1], row[:, 1:].clone()
    targets[:, :k] = IGNORE_INDEX  # the first half is random: only the copied half can be predicted
    return inputs, targets


def _recall_rows(keys: torch.Tensor, values: torch.Tensor, asked: torch.Tensor, query: int):
    n, pairs = keys.shape
    rows = torch.arange(n)
    inputs = torch.stack([keys, values], 2).reshape(n, 2 * pairs)  # k1 v1 k2 v2 ...
    inputs = torch.cat([inputs, torch.full((n, 1), query), keys[rows, asked, None]], 1)  # (N, 2 pairs + 2)
    targets = torch.full_like(inputs, IGNORE_INDEX)
    targets[:, -1] = values[rows, asked]
    return inputs, targets


def sequence_task(name: str, n: int = 1024, seq_len: int = 16, vocab: int = 32, seed: int = 0) -> SequenceTask:
    """Synthetic sequences that a causal language model can solve only by looking back: copy, reverse, recall.

    The last id, ``vocab - 1``, is reserved: the separator (copy, reverse) or the query marker (recall); it
    never appears as content. Each row, with ``T = seq_len`` and ``S`` the reserved id (a row of
    ``copy``, T = 8, vocab = 10, so S = 9)::

        copy     inputs   4 7 1 3 S 4 7 1        content c1..ck, S, then c1..ck again (k = T / 2)
                 targets  . . . . 4 7 1 3        ". " = IGNORE_INDEX (-100): only the copy is scored
        reverse  inputs   4 7 1 3 S 3 1 7        the second half is the first reversed
                 targets  . . . . 3 1 7 4
        recall   inputs   2 6 0 8 1 5 S 0        pairs key value (p = T / 2 - 1 of them), S, a key seen
                 targets  . . . . . . . 8        its value, at the last position only

    In ``recall`` (associative recall: Fu et al. 2023, H3; Arora et al. 2024, Zoology) the keys of a row
    are distinct and drawn from the lower half of the content ids, the values (which may repeat) from the
    upper half, so a key and a value are never the same token; the queried key is uniform over the row's.

    Args:
        name: one of ``SEQUENCE_TASKS``.
        n: number of rows.
        seq_len: tokens per row, T; even, at least 2 (copy, reverse) or 4 (recall).
        vocab: every id, the reserved one included; at least 3 (copy, reverse: two content tokens) or
            ``seq_len - 1`` and 4 (recall: a distinct key for each of the p pairs and two values).
        seed: seeds the ``torch.Generator`` that draws the content, so a seed gives the same rows.

    Example:
        >>> task = sequence_task("copy", n=4, seq_len=8, vocab=10)
        >>> task
        SequenceTask copy: 4 sequences x 8 tokens, vocab 10, 4 scored positions per row
        >>> bool((task.targets[:, 4:] == task.inputs[:, :4]).all())
        True
    """
    try:
        name = check_choice("sequence task", name, SEQUENCE_TASKS)
    except ValueError as error:
        raise DataError(str(error)) from None
    _check_whole("n", n, 1)
    least_len = 4 if name == "recall" else 2
    _check_whole("seq_len", seq_len, least_len)
    if seq_len % 2:
        layout = "pairs, the query marker and a key" if name == "recall" else "two halves around the separator"
        raise DataError(
            f"seq_len must be even for {name!r} ({layout}); got {seq_len}. Use {seq_len - 1} or {seq_len + 1}."
        )
    least_vocab = max(seq_len - 1, 4) if name == "recall" else 3
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < least_vocab:
        need = (
            f"{seq_len // 2 - 1} distinct keys and 2 values, below the query marker"
            if name == "recall"
            else "2 content tokens and the separator"
        )
        raise DataError(
            f"vocab {vocab!r} is too small for {name!r} with seq_len {seq_len}: it needs {need}, so vocab >= "
            f"{least_vocab}. Raise vocab{' or lower seq_len' if name == 'recall' else ''}."
        )
    g = torch.Generator().manual_seed(seed)
    reserved = vocab - 1
    if name == "recall":
        pairs, key_ids = seq_len // 2 - 1, (vocab - 1) // 2
        keys = torch.rand(n, key_ids, generator=g).argsort(1)[:, :pairs]  # distinct keys in each row
        values = torch.randint(key_ids, vocab - 1, (n, pairs), generator=g)
        asked = torch.randint(0, pairs, (n,), generator=g)
        inputs, targets = _recall_rows(keys, values, asked, reserved)
    else:
        content = torch.randint(0, vocab - 1, (n, seq_len // 2), generator=g)
        inputs, targets = _copy_rows(content, reserved, reverse=name == "reverse")
    return SequenceTask(name, inputs.contiguous(), targets.contiguous(), vocab, seq_len)


def token_dataset(name: str, n: int = 1024, seq_len: int = 16, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A token ``Dataset`` for a built transformer (``Dataset.tokens``): ``x`` int64 rows (N, T), ``y`` their
    next-token targets (N, T), -100 where nothing is scored, ``num_classes`` the vocabulary.

    - ``copy``, ``reverse``, ``recall``: ``sequence_task(name, n, seq_len, vocab=32, seed)``;
    - ``pysource``: ``n`` windows of ``seq_len`` + 1 characters of the standard library's sources
      (``python_source_text``, ``char_tokens``: vocabulary 128), every position scored.

    Rows are split at random into train and test (``test_fraction``), reproducibly by ``seed``.
    """
    name = check_choice("token set", name, TOKEN_SETS)
    if name == "pysource":
        ids, vocab = char_tokens(python_source_text(max(200_000, n * (seq_len + 1)), seed=seed))
        if len(ids) < seq_len + 2:
            raise DataError(f"The standard library's text is too short for windows of {seq_len} characters.")
        x, y = next_token_windows(ids, n, seq_len, torch.Generator().manual_seed(seed))
    else:
        task = sequence_task(name, n=n, seq_len=seq_len, seed=seed)
        x, y, vocab = task.inputs, task.targets, task.vocab
    x_train, y_train, x_test, y_test = _split(name, x, y, test_fraction, seed)
    return Dataset(
        name, x_train, y_train, x_test, y_test, "classification", int(vocab), standardized=False, tokens=True
    )


def next_token_windows(
    ids: torch.Tensor, n: int, length: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows of ``length`` tokens at random places in ``ids``, and their next tokens: (inputs, targets),
    each (n, length), targets[:, t] = ids[start + t + 1]."""
    starts = torch.randint(0, len(ids) - length - 1, (n,), generator=generator)
    windows = torch.stack([ids[s : s + length + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]
