"""Claim 22: a zero-initialized residual gate trains a deep network without normalization."""

from steadygrad.lab import _lm
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, png, subplots, verdict

CLAIM = Claim(
    22,
    "rezero",
    "A zero-initialized residual gate (x <- x + g f(x), g = 0 at start) trains a deep transformer with no "
    "normalization at all, as well as pre-LN, where the same stack without the gate fails.",
    'Bachlechner et al. 2020, "ReZero is All You Need"; De and Smith 2020, "Batch Normalization Biases Residual '
    'Blocks Towards the Identity Function in Deep Networks" (SkipInit)',
    "The character-level language model of claim 20 (Adam lr 3e-3, no warmup) with no normalization: ReZero "
    "gates (NetSpec(residual='rezero')) and plain residuals; pre-LN as the reference.",
    "ReZero ends within 0.15 nats of pre-LN; the ungated stack without normalization diverges or ends at least "
    "0.5 nats worse.",
    "Without normalization each residual branch adds its variance to the stream, so the output and the gradient "
    "grow with depth; a zero gate makes every block the identity at initialization, and each block grows into use "
    "as its gate learns.",
)


def run(ctx: Context) -> ClaimResult:
    runs = {
        "ReZero, no norm": _lm.trained(ctx, _lm.spec(ctx, residual="rezero"), 3e-3),
        "plain, no norm": _lm.trained(ctx, _lm.spec(ctx, norm="none"), 3e-3),
        "pre-LN": _lm.trained(ctx, _lm.spec(ctx), 3e-3),
    }
    finals = {k: r.final for k, r in runs.items()}
    close = finals["ReZero, no norm"] <= finals["pre-LN"] + 0.15
    plain_fails = runs["plain, no norm"].diverged or finals["plain, no norm"] >= finals["ReZero, no norm"] + 0.5
    figure, (ax,) = subplots()
    _lm.plot_losses(ax, runs, "Without normalization: the zero gate")
    first = runs["plain, no norm"].losses[0]
    return ClaimResult(
        CLAIM,
        verdict(close, plain_fails),
        f"Final loss: ReZero without normalization {_lm.show(runs['ReZero, no norm'])}, pre-LN "
        f"{_lm.show(runs['pre-LN'])}, the ungated stack without normalization {_lm.show(runs['plain, no norm'])} "
        f"(its first loss was {first:.3g}).",
        numbers={"final_loss": finals, "plain_first_loss": first},
        tables=[Table("Final loss", ["run", "final loss"], [[k, _lm.show(r)] for k, r in runs.items()])],
        figures=[Figure("A zero residual gate instead of normalization", png(figure))],
    )
