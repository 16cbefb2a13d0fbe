"""The μP coordinate check: does every layer's output keep its size as the network gets wider?

Yang et al. 2021, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer"
(arXiv:2203.03466), and its code, ``get_coord_data`` and ``plot_coord_data`` in microsoft/mup's
``mup/coord_check.py``. The same model family is built at several widths n (``torch.manual_seed(seed)`` before
each build), trained for a few steps on the same batches with the same optimizer and learning rate, and at
every recorded step t each layer's coordinate size is measured,

    s_l(n, t) = mean_i |y_l,i|,

the mean absolute value of the layer's output y_l over the batch and its units (mup's ``l1``; for a tuple or
mapping output, its first floating-point tensor, ``losses.first_tensor``; the mean over the calls of a module
called more than once). Step t is the forward pass after t updates: t = 0 is the initialization (the forward
of the first step), t = ``steps`` a forward after the last update. (mup numbers its forwards t = 1..nsteps,
each taken before that step's update, so its t = 1 is the initialization and its last update is never
measured; here every update is.)

What it says. In a parametrization whose infinite-width limit is stable and learns features (μP), every
s_l(n, t) tends to a constant as n grows: the curves against width are flat. In the standard parametrization
(SP: PyTorch's default init, one learning rate) trained with Adam, every entry of an n-wide hidden or output
weight matrix moves by about lr per step, in a direction correlated with the layer's input, so the layer's
output moves by about lr * n: after one step those sizes grow like n (the output up to n^2, through the
product of its own update and its input's), and a learning rate tuned at one width blows up at a larger one.
With SGD, SP's output grows like n and its hidden layers like n^(1/2) (Yang & Hu 2021, Tensor Programs IV).
These exponents are the large-width ones: while a layer's Θ(1) initial output still outweighs its update
(small widths, a small lr, few steps) the measured slope is lower. Measured for SP's hidden layer under Adam
at lr 1e-2: 0.42 over widths 32-256 after 3 steps, 0.9 over widths 256-2048 after one.

The fit. Layers are grouped by role: their name with depth indices replaced by ``*``
(``measure.series.template``), their class, and which side of them is width-sized (μP's classes, as mup's
``infshape`` reads them off the shapes at two widths: ``input`` maps a fixed size to a width-sized one,
``hidden`` width to width, ``output`` width to a fixed size, ``fixed`` neither). An ``nn.Sequential``'s
indices all read ``*``, so without the role its input, hidden and output layers, which μP scales differently,
would be averaged into one curve. A layer without a weight of its own (an activation, a norm) takes the role
of the weight layer that ran before it: the ReLU after an MLP's input layer is that layer's output, flat under
SP where the hidden layers' ReLUs grow. A group's size is the mean of its layers' sizes. At the last recorded step
each group gets the least-squares slope a of log s against log n: s grows like n^a. Only finite, positive
sizes enter the fit; a diverged run's sizes are kept as NaN and reported.

The verdict. A group is flat when |a| < ``FLAT_SLOPE`` = 0.25. The large-width exponents that matter are 0
(μP) and the smallest blow-up of the standard parametrization, 1/2 (its hidden layers under SGD; 1 under
Adam); 0.25 is halfway between, so finite-width wobble on a flat curve (under ±0.1 for the tests' μP MLP over
widths 32-256) does not read as growth, and a layer reads as growing once it is halfway to n^(1/2). Over a
2^3 range of widths a slope of 0.25 is a 1.7x change of size, 0.5 a 2.8x change. The check is ``flat`` when
every group is flat and no size is non-finite; otherwise the verdict names the groups that grow (a >= 0.25:
they blow up at larger widths, the parametrization is not μP), those that shrink (a <= -0.25: the layer's
update vanishes with width, e.g. an output scaled by 1/n twice, by its multiplier and its learning rate) and
those that diverged. Since measured slopes sit below their limits while the initial outputs dominate (above),
a flat check is evidence only where the updates are visible: use the learning rate and the number of steps
of real training, and widths as large as the machine allows. Flat over a few widths is necessary for μP, not
a proof of it.

Example::

    def mlp(width):
        return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 10))

    check = coord_check(mlp, [32, 64, 128, 256], steps=3, data=(x, y))
    print(check)           # sizes at the last step, slopes, verdict
    check.figure().png     # one panel per step, like the paper's figure
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from steadygrad._checks import check_choice, check_positive
from steadygrad.display import Figure, Table
from steadygrad.losses import callable_name, first_tensor, resolve_loss_named, tensors
from steadygrad.measure.hooks import kind_name
from steadygrad.measure.layers import LayerSelector, select_layers
from steadygrad.measure.probe import call_model
from steadygrad.measure.series import template
from steadygrad.optimizers import OPTIMIZERS, make_optimizer, param_groups

__all__ = ["FLAT_SLOPE", "ROLES", "CoordCheck", "coord_check", "fit_slope"]

FLAT_SLOPE = 0.25  # |a| below it is flat: halfway between μP's 0 and SP's smallest blow-up, 1/2 (module docstring)
ROLES = ("input", "hidden", "output", "fixed")  # which side of a layer is width-sized: in/out, both, in, neither
MAX_DRAWN = 8  # layer groups drawn in the figure; the rest are named in its caption
MAX_PANELS = 6  # steps drawn in the figure (the first, the last and evenly spaced ones between)
SYNTHETIC_BATCH = 32  # data=None: the batch of standard normal inputs (or token ids) drawn for the first layer
SYNTHETIC_TOKENS = 16  # data=None for a model that starts with an nn.Embedding: tokens per sequence

_ROLE = {(False, True): "input", (True, True): "hidden", (True, False): "output", (False, False): "fixed"}


# -- the result --------------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "nan"


def _none_if_nan(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(eq=False)
class CoordCheck:
    """The coordinate sizes of a model family across widths, their slopes and the verdict.

    Attributes:
        widths: the widths, increasing.
        steps: the training steps; sizes are recorded at steps 0..``steps`` (t = after t updates).
        sizes: layer group -> array (len(widths), steps + 1) of mean |y|; NaN where the run was non-finite.
        slopes: layer group -> the least-squares slope a of log size against log width at the last step (NaN
            when fewer than two finite, positive sizes are left to fit).
        verdict: the finding in words.
        flat: every group's |slope| < ``threshold`` and every size finite.
        layers: layer group -> the names of its layers.
        roles: layer group -> its role (``ROLES``): which side of its layers is width-sized.
        optimizer: which optimizer and parameter groups the runs took, in words.
        loss: which loss the runs took, in words (``losses.resolve_loss_named``).
        threshold: the flat slope (``FLAT_SLOPE``).
        notes: what else a reader should know (layers never called, the fit's left-out points).
    """

    widths: list[int]
    steps: int
    sizes: dict[str, np.ndarray]
    slopes: dict[str, float]
    verdict: str
    flat: bool
    layers: dict[str, list[str]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    optimizer: str = ""
    loss: str = ""
    threshold: float = FLAT_SLOPE
    notes: list[str] = field(default_factory=list)

    @property
    def growing(self) -> list[str]:
        """The groups whose size grows with width at the last step (slope >= threshold)."""
        return [g for g, a in self.slopes.items() if a >= self.threshold]

    @property
    def shrinking(self) -> list[str]:
        """The groups whose size shrinks with width at the last step (slope <= -threshold)."""
        return [g for g, a in self.slopes.items() if a <= -self.threshold]

    @property
    def nonfinite(self) -> list[str]:
        """The groups with a non-finite size at some width and step."""
        return [g for g, s in self.sizes.items() if not np.isfinite(s).all()]

    def slopes_at(self, step: int) -> dict[str, float]:
        """Each group's slope of log size against log width at ``step`` (0..steps; ``slopes`` is the last)."""
        step = operator.index(step)
        if not 0 <= step <= self.steps:
            raise ValueError(f"step must be between 0 and {self.steps} (the recorded steps); got {step}.")
        return {g: fit_slope(self.widths, s[:, step]) for g, s in self.sizes.items()}

    def table(self) -> Table:
        """One row per (layer group, width): the size at every step and the group's slope."""
        columns = ["layer", "width", *[f"step {t}" for t in range(self.steps + 1)], "slope"]
        rows = [
            [group, width, *[_fmt(v) for v in sizes[i]], _fmt(self.slopes[group])]
            for group, sizes in self.sizes.items()
            for i, width in enumerate(self.widths)
        ]
        return Table("Coordinate size mean |y| by layer group, width and step", columns, rows)

    def _drawn(self) -> list[str]:
        """The groups the figure draws: the ``MAX_DRAWN`` steepest (a group that could not be fitted first),
        in forward order."""
        groups = list(self.sizes)
        if len(groups) <= MAX_DRAWN:
            return groups
        steepness = {g: abs(a) if math.isfinite(a) else math.inf for g, a in self.slopes.items()}
        chosen = set(sorted(groups, key=lambda g: -steepness[g])[:MAX_DRAWN])
        return [g for g in groups if g in chosen]

    def figure(self) -> Figure:
        """The paper's figure: one panel per recorded step, width (log2) on x, mean |y| (log) on y, one line per
        layer group. At most ``MAX_DRAWN`` groups and ``MAX_PANELS`` steps; the caption names what is left out."""
        from steadygrad.measure.plot import _pyplot, figure_png

        plt = _pyplot()
        shown_steps = sorted({round(i * self.steps / (MAX_PANELS - 1)) for i in range(MAX_PANELS)})
        drawn = self._drawn()
        fig, axes = plt.subplots(1, len(shown_steps), figsize=(2.6 * len(shown_steps) + 1.5, 2.8), squeeze=False)
        for panel, t in zip(axes[0], shown_steps, strict=True):
            drawable = False
            for group in drawn:
                y = self.sizes[group][:, t]
                y = np.where(np.isfinite(y) & (y > 0), y, np.nan)  # a log axis shows neither 0 nor NaN
                drawable |= bool(np.isfinite(y).any())
                panel.plot(self.widths, y, marker="o", markersize=3, label=group)
            panel.set_xscale("log", base=2)
            if drawable:
                panel.set_yscale("log")
            else:  # every size non-finite (a diverged step): a log axis has nothing to scale to
                panel.text(0.5, 0.5, "no finite size", ha="center", va="center", transform=panel.transAxes)
                panel.set_xlim(self.widths[0] / 1.2, self.widths[-1] * 1.2)
                panel.set_yticks([])
            panel.set_title(f"step {t}", fontsize=9)
            panel.set_xlabel("width", fontsize=8)
            panel.tick_params(which="both", labelsize=7)
            panel.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("mean |y|", fontsize=8)
        axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        slopes = ", ".join(f"{g} {_fmt(self.slopes[g])}" for g in drawn)
        caption = (
            f"Coordinate check (Yang et al. 2021): mean |y| of each layer group's output against width, step t "
            f"being the forward after t updates ({self.optimizer}). Slopes of log size vs log width at step "
            f"{self.steps}: {slopes}. {self.verdict}"
        )
        left_out = [g for g in self.sizes if g not in drawn]
        if left_out:
            caption += f" Not drawn ({len(left_out)} of {len(self.sizes)} groups): {', '.join(left_out)}."
        if len(shown_steps) < self.steps + 1:
            caption += f" Steps drawn: {', '.join(map(str, shown_steps))} of 0..{self.steps}."
        return Figure("Coordinate check", figure_png(fig), caption)

    def to_dict(self) -> dict:
        """Plain JSON-serializable data; NaN (non-finite sizes, slopes that could not be fitted) as None."""
        return {
            "widths": list(self.widths),
            "steps": self.steps,
            "recorded": "step t = the forward pass after t updates, t = 0..steps",
            "sizes": {g: [[_none_if_nan(v) for v in row] for row in s] for g, s in self.sizes.items()},
            "slopes": {g: _none_if_nan(a) for g, a in self.slopes.items()},
            "slopes_by_step": [
                {g: _none_if_nan(a) for g, a in self.slopes_at(t).items()} for t in range(self.steps + 1)
            ],
            "layers": {g: list(names) for g, names in self.layers.items()},
            "roles": dict(self.roles),
            "threshold": self.threshold,
            "flat": self.flat,
            "verdict": self.verdict,
            "optimizer": self.optimizer,
            "loss": self.loss,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        """The sizes at the last step by group and width, each group's slope, the verdict and the notes."""
        name_width = max([len("layer group"), *map(len, self.sizes)])
        head = f"{'layer group':<{name_width}}" + "".join(f"{w:>10}" for w in self.widths) + f"{'slope':>10}"
        lines = [
            f"Coordinate check, widths {', '.join(map(str, self.widths))}, {self.steps} steps ({self.optimizer}; "
            f"{self.loss}). mean |y| at step {self.steps}:",
            head,
        ]
        for group, sizes in self.sizes.items():
            row = "".join(f"{_fmt(v):>10}" for v in sizes[:, -1])
            lines.append(f"{group:<{name_width}}{row}{_fmt(self.slopes[group]):>10}")
        lines.append(self.verdict)
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CoordCheck(widths={self.widths}, steps={self.steps}, groups={len(self.sizes)}, flat={self.flat})"


# -- the fit and the verdict ---------------------------------------------------------------------------------


def _groups(count: int) -> str:
    return "1 param group" if count == 1 else f"{count} param groups"


def fit_slope(widths: Sequence[float], sizes: Sequence[float]) -> float:
    """The least-squares slope a of log(size) against log(width): size grows like width^a.

    Only the points with a finite, positive size count; NaN when fewer than two are left.
    """
    x = np.asarray(widths, dtype=float)
    s = np.asarray(sizes, dtype=float)
    if x.shape != s.shape or x.ndim != 1 or (x <= 0).any():
        raise ValueError(
            f"fit_slope takes as many sizes as widths, and positive widths; got widths {list(x)} and {s.size} sizes."
        )
    x = np.log(x)
    ok = np.isfinite(s) & (s > 0)
    if ok.sum() < 2:
        return math.nan
    x, y = x[ok], np.log(s[ok])
    dx = x - x.mean()
    return float((dx * (y - y.mean())).sum() / (dx * dx).sum())


def _verdict(check: CoordCheck) -> tuple[str, bool]:
    last, lo, hi = check.steps, check.widths[0], check.widths[-1]
    unfit = [g for g, a in check.slopes.items() if not math.isfinite(a)]
    parts = []
    if check.growing:
        grows = ", ".join(f"{g} ~ width^{check.slopes[g]:.2f}" for g in check.growing)
        parts.append(f"grows with width: {grows}: these layers would blow up at larger widths (not μP)")
    if check.shrinking:
        shrinks = ", ".join(f"{g} ~ width^{check.slopes[g]:.2f}" for g in check.shrinking)
        parts.append(f"shrinks with width: {shrinks}: these layers' updates vanish at larger widths")
    if check.nonfinite:
        diverged = []  # (width, the first step with a non-finite size in any group)
        for i, width in enumerate(check.widths):
            bad = np.stack([~np.isfinite(check.sizes[g][i]) for g in check.nonfinite]).any(axis=0)
            if bad.any():
                diverged.append(f"{width} from step {int(np.argmax(bad))}")
        groups = "every group" if len(check.nonfinite) == len(check.sizes) else ", ".join(check.nonfinite)
        parts.append(
            f"non-finite sizes (the run diverged) at width {', '.join(diverged)}, in {groups}; they are NaN here "
            f"and the fit used the finite sizes only"
        )
    if unfit:
        parts.append(f"too few finite, positive sizes at step {last} to fit: {', '.join(unfit)}")
    if not parts:
        return (
            f"Flat: every layer group's mean |y| at step {last} stays within width^±{check.threshold:g} over widths "
            f"{lo}-{hi}, as μP predicts.",
            True,
        )
    return f"Not flat at step {last} (widths {lo}-{hi}, flat means |slope| < {check.threshold:g}): " + "; ".join(
        parts
    ) + ".", False


# -- the arguments -----------------------------------------------------------------------------------------------


def _check_widths(widths) -> list[int]:
    rule = "widths must be a sequence of at least 2 distinct positive integers, e.g. [32, 64, 128, 256]"
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Iterable):
        raise TypeError(f"{rule}; got {type(widths).__name__} {widths!r}.")
    values = list(widths)
    ints = []
    for w in values:
        if isinstance(w, bool):
            raise TypeError(f"{rule}; got {w!r} among them.")
        try:
            ints.append(operator.index(w))
        except TypeError:
            raise TypeError(f"{rule}; got {w!r} ({type(w).__name__}) among them.") from None
    if len(ints) < 2:
        raise ValueError(f"{rule}: a slope needs two widths; got {len(ints)}: {values!r}.")
    bad = [w for w in ints if w <= 0]
    if bad:
        raise ValueError(f"{rule}; got non-positive {bad} in {values!r}.")
    repeated = sorted({w for w in ints if ints.count(w) > 1})
    if repeated:
        raise ValueError(f"{rule}; got {repeated} more than once in {values!r}.")
    return sorted(ints)


def _check_steps(steps) -> int:
    if isinstance(steps, bool):
        raise TypeError(f"steps must be an integer >= 1; got {steps!r}.")
    try:
        steps = operator.index(steps)
    except TypeError:
        raise TypeError(f"steps must be an integer >= 1; got {steps!r}.") from None
    if steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (training steps after the initialization); got {steps}.")
    return steps


_DATA_RULE = (
    "data= takes a batch (inputs, targets) as a tuple, a callable data(step) -> (inputs, targets), an iterable of "
    "such batches (a list, a generator, a DataLoader), a tensor or mapping of inputs alone, or None for a "
    "synthetic batch"
)


def _batch(item, where: str) -> tuple:
    """(inputs, targets) from one batch: a 2-tuple or 2-list, or inputs alone (a tensor or a mapping)."""
    if isinstance(item, (tuple, list)) and not hasattr(item, "_fields"):
        if len(item) != 2:
            raise TypeError(f"{_DATA_RULE}. {where} is a {type(item).__name__} of {len(item)} items, not 2.")
        return item[0], item[1]
    if isinstance(item, (torch.Tensor, Mapping)):
        return item, None
    raise TypeError(f"{_DATA_RULE}. {where} is a {type(item).__name__}.")


def _draw_batches(data, steps: int) -> list[tuple] | None:
    """The steps + 1 batches every width trains on, drawn once (so every width sees the same data). None for
    data=None, whose synthetic batch depends on the model's first layer."""
    n = steps + 1
    if data is None:
        return None
    if isinstance(data, (tuple, torch.Tensor, Mapping)):
        return [_batch(data, "data")] * n
    if callable(data):
        return [_batch(data(t), f"data({t})") for t in range(n)]
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"{_DATA_RULE}; got {type(data).__name__}.")
    if isinstance(data, list) and data and all(isinstance(item, torch.Tensor) for item in data):
        raise TypeError(
            f"{_DATA_RULE}. A list of tensors is ambiguous: pass one batch as a tuple (inputs, targets), or batches "
            "as a list of tuples."
        )
    batches = []
    for item in data:
        batches.append(_batch(item, f"batch {len(batches)} of data"))
        if len(batches) == n:
            break
    if not batches:
        raise ValueError("data= yielded no batch; it needs at least one (inputs, targets).")
    return [batches[t % len(batches)] for t in range(n)]  # fewer than steps + 1: taken again in order


def _synthetic_batch(model: nn.Module, generator: torch.Generator) -> tuple:
    """data=None: standard normal inputs for a first nn.Linear, token ids for a first nn.Embedding; no targets,
    so the loss is the fixed random projection of the outputs (``losses`` rule 4)."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))), None)
    if isinstance(first, nn.Linear):
        return torch.randn(SYNTHETIC_BATCH, first.in_features, generator=generator), None
    if isinstance(first, nn.Embedding):
        shape = (SYNTHETIC_BATCH, SYNTHETIC_TOKENS)
        return torch.randint(0, first.num_embeddings, shape, generator=generator), None
    raise TypeError(
        f"data=None makes a batch for a model whose first layer is an nn.Linear or nn.Embedding; "
        f"{type(model).__name__} has neither. Pass data=(inputs, targets)."
    )


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to(v, device) for v in obj)
    return obj


def _make_optimizer(optimizer, model: nn.Module, lr: float) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer of one width, and in words which parameter groups it took."""
    if not isinstance(optimizer, str):
        opt = optimizer(model, lr)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer= as a callable must return a torch.optim.Optimizer from (model, lr); "
                f"{callable_name(optimizer)} returned {type(opt).__name__}."
            )
        return opt, f"{callable_name(optimizer)}(model, lr={lr:g}), {_groups(len(opt.param_groups))}"
    groups = param_groups(model, lr)
    if callable(getattr(model, "steadygrad_param_groups", None)):
        words = f"{optimizer}, lr {lr:g}, {_groups(len(groups))} from steadygrad_param_groups(lr)"
    else:
        words = f"{optimizer}, lr {lr:g}, one group (model.parameters())"
    return make_optimizer(optimizer, groups, lr), words


# -- one width ---------------------------------------------------------------------------------------------------


class _Sizes:
    """Forward hooks that collect mean |y| of every selected layer's output, per forward pass.

    The sizes stay tensors until the run ends (no host synchronisation per layer); they are reduced in float32
    at least, so a half-precision output's sum does not overflow.
    """

    def __init__(self, selected: list[tuple[str, nn.Module]]) -> None:
        self.selected = selected
        self.passes: list[dict[str, list[torch.Tensor]]] = []
        self.shapes: dict[str, tuple[tuple | None, tuple]] = {}  # name -> (input shape, output shape), 1st call
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            y = first_tensor(output)
            if y is None:
                return
            y = y.detach()
            self.passes[-1].setdefault(name, []).append(y.abs().mean(dtype=torch.promote_types(y.dtype, torch.float32)))
            if name not in self.shapes:
                inputs = tensors([args, kwargs])
                self.shapes[name] = (tuple(inputs[0].shape) if inputs else None, tuple(y.shape))

        return hook

    def __enter__(self) -> _Sizes:
        self._handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.selected]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.selected = []  # the sizes outlive the model: hold none of its modules

    def new_pass(self) -> None:
        self.passes.append({})

    def array(self, name: str) -> np.ndarray:
        """(passes,) the layer's size per pass, the mean over its calls; NaN where it was not called or where
        the size is non-finite."""
        out = np.full(len(self.passes), np.nan)
        for t, sizes in enumerate(self.passes):
            if name in sizes:
                out[t] = float(torch.stack(sizes[name]).mean())
        return np.where(np.isfinite(out), out, np.nan)


class _LayerInfo(NamedTuple):
    """What the grouping needs of a layer, kept instead of the module so that each width's model can be freed."""

    kind: str
    owns_weight: bool  # a weight of 2+ dims: a layer whose role (input, hidden, output) is its own


def _run(model, batches, optimizer, lr, loss, steps, layers) -> tuple[_Sizes, dict[str, _LayerInfo], str, str]:
    """Train ``model`` for ``steps`` steps on ``batches``, recording the sizes of the forwards t = 0..steps."""
    selected = select_layers(model, layers)
    if not selected:
        raise ValueError(f"layers={layers!r} selects no layer of {type(model).__name__}.")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    opt, opt_words = _make_optimizer(optimizer, model, lr)
    model.train()
    loss_words = ""
    with _Sizes(selected) as sizes:
        for t in range(steps + 1):
            inputs, targets = _to(batches[t], device)
            sizes.new_pass()
            if t == steps:  # the forward after the last update: nothing left to learn from it
                with torch.no_grad():
                    call_model(model, inputs)
                break
            opt.zero_grad(set_to_none=True)
            output = call_model(model, inputs)
            value, loss_words = resolve_loss_named(output, targets, loss)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"The loss must be a scalar tensor to train on; {loss_words} gave {shape}.")
            if not value.requires_grad:
                raise ValueError(
                    f"The loss ({loss_words}) does not depend on any parameter that requires grad: nothing to train."
                )
            value.backward()  # a non-finite loss trains on: its NaN reaches the sizes, which report it
            opt.step()
    layers_info = {name: _LayerInfo(kind_name(m), any(p.dim() >= 2 for p in m.parameters())) for name, m in selected}
    return sizes, layers_info, opt_words, loss_words


# -- the check ---------------------------------------------------------------------------------------------------


def coord_check(
    make_model: Callable[[int], nn.Module],
    widths: Sequence[int],
    steps: int = 4,
    data=None,
    *,
    optimizer: str | Callable[[nn.Module, float], torch.optim.Optimizer] = "adam",
    lr: float = 1e-2,
    layers: LayerSelector = None,
    seed: int = 0,
    loss: Callable | None = None,
) -> CoordCheck:
    """The μP coordinate check of the model family ``make_model`` across ``widths`` (see the module docstring).

    Args:
        make_model: ``make_model(width) -> nn.Module``, built fresh at each width after
            ``torch.manual_seed(seed)``; every width must have the same layer names.
        widths: at least 2 distinct positive integers (sorted here).
        steps: training steps (>= 1); sizes are recorded at t = 0 (the initialization) and after each update.
        data: ``(inputs, targets)`` reused every step; a callable ``data(step) -> (inputs, targets)``; an
            iterable of such batches (the first ``steps + 1``, taken again in order when there are fewer); a
            tensor or mapping of inputs alone; or None for a synthetic batch of standard normal inputs for the
            model's first ``nn.Linear`` (token ids for an ``nn.Embedding``). The batches are drawn once, after
            ``torch.manual_seed(seed)``, and every width trains on the same ones. Without targets the loss is a
            fixed random projection of the outputs (``steadygrad.losses``).
        optimizer: a name of ``steadygrad.optimizers.OPTIMIZERS`` or ``optimizer(model, lr) -> Optimizer``.
            With a name, a model that has ``steadygrad_param_groups(lr)`` (μP's per-layer learning rates, as a
            list of torch param-group dicts) is optimized over those groups, any other over
            ``model.parameters()``.
        lr: the learning rate, the same at every width.
        layers: which layers to record, as ``measure.select_layers`` takes it (None: its default selection).
        seed: seeds every build and the data; the global random state is restored afterwards. The models train
            in training mode (dropout on), as mup's do.
        loss: ``loss(output, targets) -> scalar``; None resolves it by ``steadygrad.losses`` (cross-entropy for
            integer targets, mean squared error for floating ones).

    Returns:
        a ``CoordCheck``: ``sizes`` per layer group, ``slopes`` at the last step, ``verdict`` and ``flat``.
    """
    if not callable(make_model):
        raise TypeError(f"make_model must be a callable make_model(width) -> nn.Module; got {make_model!r}.")
    widths = _check_widths(widths)
    steps = _check_steps(steps)
    lr = check_positive("lr", lr)
    if isinstance(optimizer, str):
        optimizer = check_choice("optimizer", optimizer, OPTIMIZERS, "Or pass a callable optimizer(model, lr).")
    elif not callable(optimizer):
        raise TypeError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)} or a callable (model, lr) -> torch.optim.Optimizer; "
            f"got {type(optimizer).__name__}."
        )
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be None or a callable loss(output, targets) -> scalar; got {type(loss).__name__}.")

    per_width: list[tuple[_Sizes, dict[str, _LayerInfo]]] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        batches = _draw_batches(data, steps)
        opt_words = loss_words = ""
        for width in widths:
            torch.manual_seed(seed)
            model = make_model(width)
            if not isinstance(model, nn.Module):
                raise TypeError(f"make_model({width}) must return an nn.Module; got {type(model).__name__}.")
            if batches is None:
                batches = [_synthetic_batch(model, torch.Generator().manual_seed(seed))] * (steps + 1)
            sizes, modules, words, loss_words = _run(model, batches, optimizer, lr, loss, steps, layers)
            opt_words = opt_words or words
            per_width.append((sizes, modules))
            del model

    names = list(per_width[0][1])
    for width, (_, modules) in zip(widths, per_width, strict=True):
        if list(modules) != names:
            missing, extra = sorted(set(names) - set(modules)), sorted(set(modules) - set(names))
            raise ValueError(
                f"make_model must build the same layers at every width; at width {width} the selected layers "
                f"differ from width {widths[0]}'s (missing {missing}, extra {extra})."
            )
    return _assemble(widths, steps, per_width, opt_words, loss_words)


def _assemble(widths, steps, per_width, opt_words: str, loss_words: str) -> CoordCheck:
    """Group the layers by (template, class, role), average their sizes, fit and judge."""
    first, modules = per_width[0]
    called = list(first.shapes)  # forward order at the smallest width (first calls, in insertion order)
    called += [n for sizes, _ in per_width[1:] for n in sizes.shapes if n not in called]
    notes = []
    never = [n for n in modules if n not in called]
    if never:
        notes.append(f"never called in the forward pass, so not measured: {', '.join(never)}")
    groups: dict[str, list[str]] = {}
    roles: dict[str, str] = {}
    feeding = None  # the role of the last weight layer called so far, in forward order
    for name in called:
        shapes = [sizes.shapes.get(name) for sizes, _ in per_width]
        known = [s for s in shapes if s is not None]
        in_grows = len({s[0] for s in known}) > 1 and all(s[0] is not None for s in known)
        out_grows = len({s[1] for s in known}) > 1
        role = _ROLE[(in_grows, out_grows)]
        if modules[name].owns_weight:
            feeding = role
        elif feeding is not None:
            role = feeding  # an activation or a norm: the output of the weight layer that fed it
        label = f"{template(name)} ({modules[name].kind}, {role})"
        groups.setdefault(label, []).append(name)
        roles[label] = role
        absent = [str(w) for w, s in zip(widths, shapes, strict=True) if s is None]
        if absent:
            notes.append(f"{name} was not called at width {', '.join(absent)}: its sizes there are NaN")
    sizes = {
        label: np.stack([np.mean([s.array(n) for n in names], axis=0) for s, _ in per_width])
        for label, names in groups.items()
    }
    slopes = {label: fit_slope(widths, s[:, -1]) for label, s in sizes.items()}
    left_out = {}  # width -> the groups whose fit leaves it out
    for label, s in sizes.items():
        if math.isfinite(slopes[label]):
            for width, v in zip(widths, s[:, -1], strict=True):
                if not (math.isfinite(v) and v > 0):
                    left_out.setdefault(width, []).append(label)
    if left_out:
        where = "; ".join(
            f"width {w} ({'every group' if len(gs) == len(sizes) else ', '.join(gs)})" for w, gs in left_out.items()
        )
        notes.append(f"the slopes at step {steps} leave out the sizes that are non-finite or zero there: {where}")
    check = CoordCheck(
        widths=list(widths),
        steps=steps,
        sizes=sizes,
        slopes=slopes,
        verdict="",
        flat=False,
        layers=groups,
        roles=roles,
        optimizer=opt_words,
        loss=loss_words,
        notes=notes,
    )
    check.verdict, check.flat = _verdict(check)
    return check
