"""The per-layer record that the probe and the monitor both produce, and the report around them."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from steadygrad import kinds
from steadygrad.measure.series import series

__all__ = ["FlowReport", "LayerRecord"]


@dataclass
class LayerRecord:
    """What one layer did in one forward and backward pass. Floats are NaN where not applicable."""

    name: str  # module name in model.named_modules()
    kind: str  # module class
    index: int  # position in execution order, 0 = first
    call: int = 1  # which call, for a module used several times in one forward
    act_mean: float = math.nan  # statistics of the layer's output (finite values only)
    act_std: float = math.nan
    act_min: float = math.nan
    act_max: float = math.nan
    act_second_moment: float = math.nan  # E[y^2]
    saturated: float = math.nan  # fraction of saturated tanh/sigmoid outputs
    dead: float = math.nan  # fraction of rectifier units <= 0 for every sample
    grad_norm: float = math.nan  # ||dL/d output||
    grad_ratio: float = math.nan  # grad_norm / the next layer's grad_norm
    weight_grad_norm: float = math.nan
    bias_grad_norm: float = math.nan
    weight_var: float = math.nan
    nonfinite_act: int = 0  # NaN/Inf values in the output
    nonfinite_grad: int = 0  # NaN/Inf values in the gradient
    update_ratio: float = math.nan  # ||W_after - W_before|| / ||W_before|| over an optimizer step (Monitor)
    # whether this step measured the update ratio (a Monitor's step that compared the weights before and after):
    # False on the probe's records, on steps Monitor(update_every=k) samples out and on monitor.step(); an
    # update_ratio of NaN with this True means measured and not applicable (no weight, or not updated)
    update_measured: bool = False
    predicted_grad_norm: float = math.nan  # mean-field theory, where it applies
    predicted_second_moment: float = math.nan
    # attention layers (measure.attention): mean row entropy in nats, averaged over heads and its lowest head,
    # and the largest finite attention logit; NaN where the layer computes no attention or it was fused
    attn_entropy: float = math.nan
    attn_entropy_min: float = math.nan
    attn_max_logit: float = math.nan
    attn_entropy_fraction: float = math.nan  # the entropy over its most (uniform attention over the allowed keys)

    @property
    def label(self) -> str:
        """The name a person reads: an ``nn.Sequential`` index gets its kind (``3 (Tanh)``, not ``3``), a module
        called several times its call (``cell (call 2)``)."""
        name = self.name
        if name.rsplit(".", 1)[-1].isdigit() and self.kind:
            name = f"{name} ({self.kind})"
        return name if self.call == 1 else f"{name} (call {self.call})"

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> LayerRecord:
        names = {f.name for f in fields(cls)}
        known = {k: (math.nan if v is None else v) for k, v in data.items() if k in names}
        if "update_measured" not in data:  # written before the field existed: a ratio there was measured
            known["update_measured"] = data.get("update_ratio") is not None
        return cls(**known)


_COLUMNS = ("#", "layer", "kind", "act mean", "act std", "sat", "dead", "grad norm", "ratio", "W grad", "W var")
_DETAIL = ("act mean", "W grad", "W var")  # left out of the compact table
_FULL_WIDTH = 120  # a terminal this wide shows every column


def _fmt(value: float, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if percent:
        return f"{100 * value:.0f}%"
    return f"{value:.3g}"


@dataclass
class FlowReport:
    """How signal and gradient travelled through a model in one step: a record per layer.

    ``table()`` for the terminal, ``summary()`` in plain words, ``plot()`` for the eye, ``to_dict()`` /
    ``to_json()`` for files; in a notebook it shows itself as a table with its plot.
    """

    records: list[LayerRecord]
    loss: float = math.nan
    input_grad_norm: float = math.nan
    label: str = ""
    unused: list[str] = field(default_factory=list)  # selected layers the forward never called
    theory: str = ""  # what the mean-field prediction assumed, when one is attached
    step: int | None = None  # the optimizer step, for a Monitor's reports
    loss_name: str = ""  # which loss the step took, in words (steadygrad.losses says how it is chosen)
    skipped: dict[str, str] = field(default_factory=dict)  # module class -> why no module of it was recorded
    notes: list[str] = field(default_factory=list)  # what the reader must know to read the records right
    chance_loss: float = math.nan  # ln(classes) for a cross-entropy loss: what uniform predictions score

    # -- numbers -------------------------------------------------------------------------------------
    def _with_gradient(self) -> list[LayerRecord]:
        return [r for r in self.records if math.isfinite(r.grad_norm) and r.grad_norm > 0]

    @property
    def gradient_ratio(self) -> float:
        """||dL/dy|| at the first layer over the last layer's (NaN without gradients)."""
        layers = self._with_gradient()
        return layers[0].grad_norm / layers[-1].grad_norm if len(layers) >= 2 else math.nan

    @property
    def gradient_factor_per_layer(self) -> float:
        """Geometric mean of the gradient's change per layer, from the last layer back to the first."""
        layers = self._with_gradient()
        if len(layers) < 2:
            return math.nan
        return self.gradient_ratio ** (1.0 / (len(layers) - 1))

    # -- text ----------------------------------------------------------------------------------------
    def _gradient_sentence(self) -> str:
        """How the gradient changed across depth. A plain chain (a built net's blocks, an MLP) is read from its
        last layer back to its first. Any other model is read along its longest series of like layers
        (``steadygrad.measure.series``: ``transformer.h.*.mlp.c_fc``), since its first and last modules (an
        embedding and a head) are not comparable; where the records hold a stack's blocks, along their series:
        the residual stream, which the stream rules of ``diagnose`` read too."""
        layers = self._with_gradient()
        every = series(layers)
        streams = [s for s in every if s.call == 1 and kinds.is_block(s.kind)]
        longest = max(streams or every, key=lambda s: len(s.records), default=None)
        if longest is None or len(longest.records) >= len(layers) - 1:
            ratio, n, unit = self.gradient_ratio, len(layers), "layer"
            where = "at layer 1 it is {ratio:.2g} {size} its last-layer size"
        else:
            first, last = longest.records[0], longest.records[-1]
            ratio, n, unit = first.grad_norm / last.grad_norm, len(longest.records), "depth"
            where = f"at {first.label} it is {{ratio:.2g}} {{size}} its size at {last.label}"
        factor = ratio ** (1.0 / (n - 1))
        size = "of" if ratio < 1 else "times"
        if 0.5 <= ratio <= 2:
            head = f"Gradient is steady: about {factor:.2f}x per {unit} over {n} {unit}s; "
        else:
            head = f"Gradient {'shrinks' if ratio < 1 else 'grows'} about {factor:.2f}x per {unit} over {n} {unit}s; "
        return head + where.format(ratio=ratio, size=size) + "."

    def first_nonfinite(self) -> str | None:
        """Where non-finite values first appear, in words: a layer's output (the forward pass runs first to last),
        else a layer's gradient (the backward pass runs last to first); None when every value was finite."""
        for record in self.records:
            if record.nonfinite_act:
                return f"the output of {record.label}"
        for record in reversed(self.records):
            if record.nonfinite_grad:
                return f"the gradient of {record.label}"
        return None

    def summary(self) -> str:
        """What happened, in plain words."""
        layers = self._with_gradient()
        lines = [self._gradient_sentence()] if len(layers) >= 2 else []
        learning = {r.name for r in layers}  # a reused module one call of which gets none still learns
        zero = [r for r in self.records if r.grad_norm == 0 and r.name not in learning]
        if zero:  # left out of the sentence above (no ratio to read), so said here
            names = ", ".join(r.label for r in zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
            lines.append(f"{len(zero)} layer(s) get exactly zero gradient: {names}.")
        finite_std = [r for r in self.records if math.isfinite(r.act_std)]
        if len(finite_std) >= 2:
            lines.append(
                f"Activation std goes from {finite_std[0].act_std:.3g} at {finite_std[0].label} to "
                f"{finite_std[-1].act_std:.3g} at {finite_std[-1].label}."
            )
        for what, attr in (("saturated", "saturated"), ("dead", "dead")):
            bad = [r for r in self.records if math.isfinite(getattr(r, attr)) and getattr(r, attr) > 0.5]
            if bad:
                worst = max(bad, key=lambda r: getattr(r, attr))
                lines.append(
                    f"{len(bad)} layer(s) have most units {what} (worst: {worst.label}, "
                    f"{100 * getattr(worst, attr):.0f}%)."
                )
        where = self.first_nonfinite()
        if where is not None:
            lines.append(f"Non-finite values first appear in {where}.")
        if math.isfinite(self.input_grad_norm):
            lines.append(f"Gradient norm with respect to the input: {self.input_grad_norm:.3g}.")
        predicted = [r for r in layers if math.isfinite(r.predicted_grad_norm)]
        if len(predicted) >= 2:
            p = predicted[0].predicted_grad_norm / predicted[-1].predicted_grad_norm
            m = predicted[0].grad_norm / predicted[-1].grad_norm
            lines.append(f"Mean-field theory predicts a first/last gradient ratio of {p:.3g}; measured {m:.3g}.")
        attention = [r for r in self.records if math.isfinite(r.attn_entropy)]
        if attention:
            low = min(attention, key=lambda r: r.attn_entropy_min)
            sentence = (
                f"Attention entropy over {len(attention)} attention layer(s): {attention[0].attn_entropy:.3g} nats at "
                f"{attention[0].label} to {attention[-1].attn_entropy:.3g} at {attention[-1].label}; lowest head "
                f"{low.attn_entropy_min:.3g} at {low.label}"
            )
            logits = [r for r in attention if math.isfinite(r.attn_max_logit)]
            if logits:
                top = max(logits, key=lambda r: r.attn_max_logit)
                sentence += f"; largest attention logit {top.attn_max_logit:.3g} at {top.label}"
            lines.append(sentence + ".")
        if self.unused:
            lines.append(f"Never called in the forward pass: {', '.join(self.unused)}.")
        return "\n".join(lines)

    def __str__(self) -> str:
        """What ``print(report)`` shows: the label, the loss it took, the summary and the notes."""
        head = self.label or "FlowReport"
        if self.step is not None:
            head += f", step {self.step}"
        loss = f"loss {self.loss:.4g}" if math.isfinite(self.loss) else "no loss"
        head += f" ({len(self.records)} layer records; {loss}{f': {self.loss_name}' if self.loss_name else ''})"
        lines = [head, self.summary() or "No layer received a gradient."]
        lines += [f"Note: {note}" for note in self.notes]
        if self.skipped:
            lines.append("Not recorded: " + "; ".join(f"{cls} ({why})" for cls, why in self.skipped.items()) + ".")
        return "\n".join(lines)

    def __repr__(self) -> str:
        loss = f"{self.loss:.4g}" if math.isfinite(self.loss) else "nan"
        step = f", step={self.step}" if self.step is not None else ""
        return f"FlowReport({self.label or '-'!r}{step}, {len(self.records)} records, loss={loss})"

    def show(self, console=None) -> None:
        """Print the table and the summary in a terminal (``rich``); in a notebook the report shows itself. A
        terminal narrower than the full table gets the compact one (``table(compact=True)``)."""
        from rich.console import Console

        console = console or Console()
        console.print(self.table(compact=console.width < _FULL_WIDTH))
        console.print(str(self))

    def table(self, compact: bool = False):
        """A ``rich.table.Table`` with one row per record (``show()`` prints it; in a script a bare ``table()``
        is an object, to print with ``rich.print`` or a ``Console``). ``compact`` keeps the columns that locate
        a problem (std, saturated, dead, gradient norm and ratio) for a narrow terminal."""
        from rich.table import Table

        theory = any(math.isfinite(r.predicted_grad_norm) for r in self.records)
        table = Table(title=self.label or None, title_justify="left")
        columns = [c for c in _COLUMNS if not (compact and c in _DETAIL)]
        columns += ["predicted grad"] if theory and not compact else []
        columns += ["attn H", "min H", "max logit"] if any(math.isfinite(r.attn_entropy) for r in self.records) else []
        for column in columns:
            # numbers are never cut ("0.0…" would say nothing): a narrow terminal folds the names instead
            text = column in ("layer", "kind")
            table.add_column(column, justify="left" if text else "right", no_wrap=not text, overflow="fold")
        for r in self.records:
            cells = {
                "#": str(r.index + 1),
                "layer": r.label,
                "kind": r.kind,
                "act mean": _fmt(r.act_mean),
                "act std": _fmt(r.act_std),
                "sat": _fmt(r.saturated, True),
                "dead": _fmt(r.dead, True),
                "grad norm": _fmt(r.grad_norm),
                "ratio": _fmt(r.grad_ratio),
                "W grad": _fmt(r.weight_grad_norm),
                "W var": _fmt(r.weight_var),
                "predicted grad": _fmt(r.predicted_grad_norm),
                "attn H": _fmt(r.attn_entropy),
                "min H": _fmt(r.attn_entropy_min),
                "max logit": _fmt(r.attn_max_logit),
            }
            style = "red" if (r.nonfinite_act or r.nonfinite_grad) else None
            table.add_row(*(cells[c] for c in columns), style=style)
        return table

    # -- files ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        return {
            "step": self.step,
            "label": self.label,
            "loss": clean(self.loss),
            "input_grad_norm": clean(self.input_grad_norm),
            "gradient_ratio": clean(self.gradient_ratio),
            "gradient_factor_per_layer": clean(self.gradient_factor_per_layer),
            "summary": self.summary(),
            "theory": self.theory,
            "unused": list(self.unused),
            "loss_name": self.loss_name,
            "skipped": dict(self.skipped),
            "notes": list(self.notes),
            "chance_loss": clean(self.chance_loss),
            "layers": [r.to_dict() for r in self.records],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON (NaN written as null); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict) -> FlowReport:
        def num(v):
            return math.nan if v is None else v

        return cls(
            records=[LayerRecord.from_dict(r) for r in data["layers"]],
            loss=num(data.get("loss")),
            input_grad_norm=num(data.get("input_grad_norm")),
            label=data.get("label", ""),
            unused=list(data.get("unused", [])),
            theory=data.get("theory", ""),
            step=data.get("step"),
            loss_name=data.get("loss_name", ""),
            skipped=dict(data.get("skipped", {})),
            notes=list(data.get("notes", [])),
            chance_loss=num(data.get("chance_loss")),
        )

    # -- pictures ------------------------------------------------------------------------------------
    def plot(self, path: str | Path | None = None):
        """Activation std and gradient norm per layer, log scale; returns the matplotlib Figure."""
        from steadygrad.measure.plot import plot_flow

        return plot_flow([self], path)

    def _repr_html_(self) -> str:
        from steadygrad.measure.plot import figure_png

        head = "".join(
            f"<th>{html.escape(c)}</th>" for c in ("#", "layer", "kind", "act std", "sat", "dead", "grad norm", "ratio")
        )
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(c))}</td>"
                for c in (
                    r.index + 1,
                    r.label,
                    r.kind,
                    _fmt(r.act_std),
                    _fmt(r.saturated, True),
                    _fmt(r.dead, True),
                    _fmt(r.grad_norm),
                    _fmt(r.grad_ratio),
                )
            )
            + "</tr>"
            for r in self.records
        )
        png = base64.b64encode(figure_png(self.plot())).decode()
        summary = html.escape(self.summary()).replace("\n", "<br>")
        return (
            f"<div><p>{summary}</p><img src='data:image/png;base64,{png}' style='max-width:100%'>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
        )
