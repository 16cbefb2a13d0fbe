"""Claim 24: attention logits grow and collapse attention entropy; QK normalization keeps them steady."""

from steadygrad.lab import _lm
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict

CLAIM = Claim(
    24,
    "qk-norm",
    "At a high learning rate the attention logits grow until attention collapses onto single keys (entropy near "
    "0) and training suffers; normalizing queries and keys keeps the logits bounded, the entropy up and the loss "
    "lower.",
    'Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse"; Dehghani et al. '
    '2023, "Scaling Vision Transformers to 22 Billion Parameters"',
    "A 4-block pre-LN character-level language model (width 64; quick: width 32), Adam lr 2e-2 for 150 steps "
    "(quick 50), without and with NetSpec(qk_norm=True); the Monitor records every layer's attention entropy per "
    "head and largest logit every 15 steps (quick: 5).",
    "Without QK norm the largest logit grows at least 5-fold and the lowest head's entropy falls below 0.3 nats; "
    "with it the logit stays within 4x of its start and the entropy above 0.6; QK norm's final loss is lower.",
    "A logit is a dot product of a query and a key, both of which grow with the weights; once one logit dominates "
    "a row, the softmax's gradient vanishes for the others and the head is stuck. Normalizing q and k bounds the "
    "product by the head dimension times the norms' gains.",
)


def run(ctx: Context) -> ClaimResult:
    depth, every = 4, ctx.size(15, 5)
    runs = {
        "no QK norm": _lm.trained(ctx, _lm.spec(ctx, depth=depth), 2e-2, log_every=every),
        "QK norm": _lm.trained(ctx, _lm.spec(ctx, depth=depth, qk_norm=True), 2e-2, log_every=every),
    }
    plain, normed = runs["no QK norm"], runs["QK norm"]
    growth = {k: r.max_logit[-1] / r.max_logit[0] for k, r in runs.items()}
    lowest = {k: r.entropy_min[-1] for k, r in runs.items()}
    collapses = growth["no QK norm"] >= 5 and lowest["no QK norm"] < 0.3
    steady = growth["QK norm"] < 4 and lowest["QK norm"] > 0.6
    better = normed.final < plain.final
    figure, (loss_ax, entropy_ax, logit_ax) = subplots(3, width=4.6)
    _lm.plot_losses(loss_ax, runs, "Adam lr 2e-2")
    for name, r in runs.items():
        logged = [1 + i * every for i in range(len(r.entropy_min))]
        entropy_ax.plot(logged, r.entropy_min, marker="o", label=name)
        logit_ax.plot(logged, r.max_logit, marker="o", label=name)
    entropy_ax.set_title("Lowest head's attention entropy")
    entropy_ax.set_ylabel("nats")
    logit_ax.set_title("Largest attention logit")
    logit_ax.set_yscale("log")
    for ax in (entropy_ax, logit_ax):
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return ClaimResult(
        CLAIM,
        verdict(collapses, steady, better),
        f"Without QK norm the largest logit grows {fmt(growth['no QK norm'])}x and the lowest head's entropy ends at "
        f"{fmt(lowest['no QK norm'])} nats (final loss {_lm.show(plain)}); with QK norm {fmt(growth['QK norm'])}x "
        f"and {fmt(lowest['QK norm'])} nats (final loss {_lm.show(normed)}).",
        numbers={"logit_growth": growth, "lowest_entropy": lowest, "final_loss": {k: r.final for k, r in runs.items()}},
        tables=[
            Table(
                "Attention at the end of training",
                ["run", "largest logit: first -> last", "lowest head entropy (nats)", "final loss"],
                [
                    [k, f"{fmt(r.max_logit[0])} -> {fmt(r.max_logit[-1])}", fmt(r.entropy_min[-1]), _lm.show(r)]
                    for k, r in runs.items()
                ],
            )
        ],
        figures=[Figure("Attention entropy collapse and QK normalization", png(figure))],
    )
