"""Claim 21: DeepNorm makes a deep post-LN transformer trainable where plain post-LN fails."""

from steadygrad.lab import _lm
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, png, subplots, verdict

CLAIM = Claim(
    21,
    "deepnorm",
    "DeepNorm (x <- LN(alpha x + f(x)) with alpha = (2N)^(1/4), and v, output and MLP weights scaled by "
    "beta = (8N)^(-1/4)) trains a deep post-LN transformer at a learning rate where plain post-LN fails.",
    'Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers"',
    "The character-level language model of claim 20 (post-LN, Adam lr 3e-3, no warmup), plain and with "
    "NetSpec(residual='deepnorm').",
    "DeepNorm's final loss is at least 0.3 nats below plain post-LN's.",
    "Up-weighting the residual stream (alpha) and down-scaling the branches (beta) bounds how far one update can "
    "move the model's output, whatever the depth: the post-LN stack keeps its normalized stream and loses its "
    "instability.",
)


def run(ctx: Context) -> ClaimResult:
    runs = {
        "post-LN": _lm.trained(ctx, _lm.spec(ctx, norm_position="post"), 3e-3),
        "post-LN + DeepNorm": _lm.trained(ctx, _lm.spec(ctx, residual="deepnorm"), 3e-3),
    }
    finals = {k: r.final for k, r in runs.items()}
    trains = finals["post-LN + DeepNorm"] < finals["post-LN"] - 0.3
    depth = ctx.size(8, 4)
    figure, (ax,) = subplots()
    _lm.plot_losses(ax, runs, f"{depth}-block post-LN transformer, Adam lr 3e-3, no warmup")
    return ClaimResult(
        CLAIM,
        verdict(trains),
        f"Final loss: plain post-LN {_lm.show(runs['post-LN'])}, DeepNorm {_lm.show(runs['post-LN + DeepNorm'])} "
        f"(alpha = {(2 * depth) ** 0.25:.3g}, beta = {(8 * depth) ** -0.25:.3g}).",
        numbers={"final_loss": finals},
        tables=[Table("Final loss", ["run", "final loss"], [[k, _lm.show(r)] for k, r in runs.items()])],
        figures=[Figure("DeepNorm", png(figure))],
        notes="Plain post-LN does not diverge here: it stalls near the loss of predicting character frequencies.",
    )
