"""The doctor's results: each trial's repeats, the ranking on held-out loss, and the rule for a recommendation.

**The rule.** A candidate is *recommended* when its held-out loss is at least ``MARGIN`` (5%) below the
control's in every repeat, paired by seed (the same initial weights before the fix, the same batch order), and
the model needs a fix: a warning or critical finding, or a control that diverged or did not learn. Among the
winners, the best one a finding asked for comes first (it removes the cause), then the best of the others. When the best
candidate wins by the margin on the median but not in every repeat it is reported as *uncertain*, with the
spread. On a model with no such problem nothing is recommended: a candidate that trains a healthy model a little
faster over a few dozen steps is tuning, not a repair, and it is shown as measured, not prescribed.

The held-out loss is measured on batches no trial trains on, so a candidate that only memorizes the training
batches faster (a larger initialization on random labels) does not win.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from steadygrad.diagnose import Finding
from steadygrad.doctor._trial import Repeat

__all__ = ["MARGIN", "DoctorReport", "Trial"]

MARGIN = 0.05  # relative held-out loss improvement over the control, in every repeat


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


@dataclass
class Trial:
    """One candidate (or the control) over its repeats."""

    fix: str
    action: str = ""  # the Fix action it answers ("" for the control)
    patch: str = ""
    prompted: bool = False  # asked for by a finding (else tried on every model)
    repeats: list[Repeat] = field(default_factory=list)
    grad_ratio: float = math.nan  # first / last layer gradient norm at the start (the probe of the first repeat)
    error: str = ""  # the fix could not be applied, or every repeat failed

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.repeats) and all(r.ok for r in self.repeats)

    @property
    def held_out_losses(self) -> list[float]:
        return [r.held_out_loss for r in self.repeats]

    @property
    def held_out_loss(self) -> float:
        """The median over repeats (NaN when any repeat failed)."""
        return statistics.median(self.held_out_losses) if self.ok else math.nan

    @property
    def final_loss(self) -> float:
        """The median over repeats of the mean training loss of the last five steps."""
        values = [r.final_loss for r in self.repeats]
        return statistics.median(values) if self.ok else math.nan

    @property
    def initial_loss(self) -> float:
        values = [r.initial_held_out_loss for r in self.repeats if math.isfinite(r.initial_held_out_loss)]
        return statistics.median(values) if values else math.nan

    @property
    def losses(self) -> list[float]:
        """The first repeat's training curve (for plots)."""
        return self.repeats[0].losses if self.repeats else []

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.repeats)

    @property
    def steps(self) -> int:
        return min((r.steps for r in self.repeats), default=0)

    @property
    def nonfinite(self) -> int:
        """How many repeats hit a NaN/Inf loss or gradient."""
        return sum(r.nonfinite_step is not None for r in self.repeats)

    @property
    def loss_drop(self) -> float:
        """1 - held-out loss after / before training (median over repeats)."""
        before, after = self.initial_loss, self.held_out_loss
        return 1 - after / before if math.isfinite(after) and before > 0 else math.nan

    def status(self) -> str:
        """What went wrong in words, or "" when every repeat ran: never a bare NaN."""
        if self.error:
            return self.error
        errors = [r.error for r in self.repeats if r.error]
        if errors:
            return errors[0]
        bad = [r for r in self.repeats if r.nonfinite_step is not None]
        if bad:
            return f"diverged (NaN/Inf at step {bad[0].nonfinite_step}) in {len(bad)} of {len(self.repeats)} repeats"
        return ""

    def improvements(self, control: Trial) -> list[float]:
        """Per repeat, paired by seed: 1 - held-out loss / the control's (1.0 where the control diverged and this
        did not; -inf where this failed)."""
        theirs = {r.seed: r for r in control.repeats}
        out = []
        for r in self.repeats:
            c = theirs.get(r.seed)
            if not r.ok:
                out.append(-math.inf)
            elif c is None or not c.ok:
                out.append(1.0)
            else:
                out.append(1 - r.held_out_loss / c.held_out_loss if c.held_out_loss > 0 else 0.0)
        return out

    def spread(self) -> tuple[float, float]:
        values = [v for v in self.held_out_losses if math.isfinite(v)]
        return (min(values), max(values)) if values else (math.nan, math.nan)

    def to_dict(self, control: Trial | None = None) -> dict:
        low, high = self.spread()
        out = {
            "fix": self.fix,
            "action": self.action,
            "prompted": self.prompted,
            "held_out_loss": _clean(self.held_out_loss),
            "held_out_spread": [_clean(low), _clean(high)],
            "initial_held_out_loss": _clean(self.initial_loss),
            "final_train_loss": _clean(self.final_loss),
            "loss_drop": _clean(self.loss_drop),
            "grad_ratio": _clean(self.grad_ratio),
            "nonfinite": self.nonfinite,
            "seconds": round(self.seconds, 3),
            "steps": self.steps,
            "patch": self.patch,
            "error": self.status(),
            "repeats": [r.to_dict() for r in self.repeats],
        }
        if control is not None:
            out["improvement"] = [_clean(v) for v in self.improvements(control)]
        return out


@dataclass
class DoctorReport:
    findings: list[Finding]
    control: Trial
    candidates: list[Trial]  # best held-out loss first; failed ones last
    skipped: list[str] = field(default_factory=list)  # candidates not run, each with why
    seconds: float = 0.0
    loss_name: str = ""  # the loss every trial trains and scores, in words (steadygrad.losses)
    repeats: int = 0  # seeds per trial
    notes: list[str] = field(default_factory=list)  # the data, the targets, fewer repeats than asked, ...
    margin: float = MARGIN
    prior_loss: float = math.nan  # held-out loss of predicting without the inputs (label frequencies, target mean)

    # the control's own findings: symptoms of how it trained, which point at the training settings
    TRAINING_FINDINGS = ("training_diverged", "not_learning")

    @property
    def needs_fix(self) -> bool:
        """A warning or critical finding (the control's own training included)."""
        return any(f.severity in ("warning", "critical") for f in self.findings)

    def learns(self, trial: Trial) -> bool:
        """Below the prior's loss (when there is one): a fix that leaves the model no better than predicting
        without its inputs is not a fix, however much it beats a control that blew up."""
        return not math.isfinite(self.prior_loss) or trial.held_out_loss < self.prior_loss

    def winners(self, every: bool = True) -> list[Trial]:
        """The candidates that beat the control by ``margin`` in every seed (or on the median) and learn, best
        first. When the only problems are the control's own training (it diverged, or learned little), only the
        fixes those findings name count: the evidence is about the settings, not the initialization."""
        pick = min if every else statistics.median
        serious = [f for f in self.findings if f.severity in ("warning", "critical")]
        allowed = None
        if serious and all(f.kind in self.TRAINING_FINDINGS for f in serious):
            allowed = {fix.action for f in serious for fix in f.fixes}
        return [
            t
            for t in self.candidates
            if t.ok
            and self.learns(t)
            and (allowed is None or t.action in allowed)
            and pick(t.improvements(self.control)) >= self.margin
        ]

    def _winner(self, every: bool) -> Trial | None:
        """A fix a finding asked for comes before a training setting that was only tried: both beat the
        control, but the fix removes the cause (inputs standardized) where the setting works around it (a lower
        learning rate for 0-255 inputs)."""
        if not self.needs_fix:
            return None
        won = self.winners(every)
        prompted = [t for t in won if t.prompted]
        return (prompted or won or [None])[0]

    @property
    def recommended(self) -> Trial | None:
        """The best candidate when it beats the control by ``margin`` in every repeat (module docstring)."""
        return self._winner(every=True)

    @property
    def uncertain(self) -> Trial | None:
        """The best candidate when it beats the control on the median but not in every repeat."""
        return None if self.recommended is not None else self._winner(every=False)

    def _verdict(self) -> str:
        best, maybe = self.recommended, self.uncertain
        c = self.control
        if best is not None:
            low, high = best.spread()
            others = [t.fix for t in self.winners() if t is not best][:3]
            also = f" Also better in every seed: {'; '.join(others)}." if others else ""
            against = f"the control's {_fmt(c.held_out_loss)}" if c.ok else "a control that diverged"
            return (
                f"Recommended: {best.fix} (held-out loss {best.held_out_loss:.4g}, {low:.4g} to {high:.4g} over "
                f"{len(best.repeats)} seed(s), against {against}; better by at least {self.margin:.0%} in "
                f"{_every(len(best.repeats))}).{also}"
            )
        if maybe is not None:
            low, high = maybe.spread()
            gains = ", ".join(f"{g:+.0%}" for g in maybe.improvements(c))
            return (
                f"Uncertain: {maybe.fix} beats the control on the median held-out loss ({maybe.held_out_loss:.4g} "
                f"against {_fmt(c.held_out_loss)}) but not in every seed (per seed {gains}; range {low:.4g} to "
                f"{high:.4g}): try it, with more steps or seeds to be sure."
            )
        if not self.needs_fix:
            better = [t for t in self.candidates if t.ok and min(t.improvements(c)) >= self.margin]
            tail = (
                f" ({better[0].fix} trained it faster in {_every(self.repeats)}: that is tuning, not a fix.)"
                if better
                else ""
            )
            return "No change recommended: no finding and the unchanged model learns." + tail
        if self.candidates:
            return f"No candidate beat the unchanged model by {self.margin:.0%} on held-out loss in every seed."
        return "No change recommended: no candidate could be tried."

    def summary(self) -> str:
        lines = [str(f) for f in self.findings] or ["No findings: the gradient flow and the inputs look healthy."]
        lines.append(self._verdict())
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [f"{'fix':<72} {'held-out':>10} {'spread':>19} {'vs control':>11}  status"]
        for t in [self.control, *self.candidates]:
            low, high = t.spread()
            gain = "" if t is self.control else _fmt_gain(min(t.improvements(self.control), default=math.nan))
            rows.append(
                f"{t.fix[:72]:<72} {_fmt(t.held_out_loss):>10} {_fmt(low):>9}-{_fmt(high):<9} {gain:>11}  {t.status()}"
            )
        notes = [*self.notes, f"loss: {self.loss_name}"] if self.loss_name else self.notes
        return "\n".join([self.summary(), "", *rows, *(f"skipped: {s}" for s in self.skipped), *notes])

    def __repr__(self) -> str:
        best = self.recommended
        return (
            f"DoctorReport({len(self.findings)} findings, {len(self.candidates)} candidates x {self.repeats} seeds, "
            f"recommended={best.fix if best else None!r})"
        )

    def patch(self) -> str:
        best = self.recommended or self.uncertain
        return best.patch if best is not None else ""

    def to_dict(self) -> dict:
        best, maybe = self.recommended, self.uncertain
        return {
            "findings": [f.to_dict() for f in self.findings],
            "control": self.control.to_dict(),
            "candidates": [t.to_dict(self.control) for t in self.candidates],
            "recommended": None if best is None else best.fix,
            "uncertain": None if maybe is None else maybe.fix,
            "patch": self.patch(),
            "margin": self.margin,
            "repeats": self.repeats,
            "skipped": self.skipped,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
            "loss_name": self.loss_name,
        }


def _every(repeats: int) -> str:
    return "every seed" if repeats > 1 else "its one seed"


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else "-"


def _fmt_gain(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    return f"{v:+.1%} min" if v > -10 else "< -999% min"
