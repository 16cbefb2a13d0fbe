"""Claim 17: Fixup trains a deep residual network with no normalization layer."""

from steadygrad.init import fixup_
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, plot_accuracy, png, subplots, verdict
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    17,
    "fixup",
    "Fixup trains a deep residual network with no normalization layer.",
    'Zhang, Dauphin, Ma 2019, "Fixup Initialization: Residual Learning Without Normalization"',
    "A 30-block residual MLP (two-layer pre-activation branches, width 64, ReLU) on digits with SGD at lr 0.01: "
    "Fixup (steadygrad.init.fixup_), BatchNorm with He init, and plain He init without normalization.",
    "Fixup and BatchNorm both train; plain He init diverges (the residual stream's variance doubles per block).",
    "Each He-initialized branch adds as much variance as the stream already has, so after L blocks it is 2^L "
    "larger. Fixup zeroes each branch's last layer and shrinks the others by L^(-1/(2m-2)): the net starts as the "
    "identity and every branch's first update is of the right size.",
)


def run(ctx: Context) -> ClaimResult:
    epochs = ctx.size(3, 1)
    blocks = ctx.size(30, 20)
    results = {}
    for variant in ("fixup", "batchnorm", "plain He"):
        spec = NetSpec(
            depth=blocks + 1,
            width=64,
            in_features=64,
            skip="residual",
            branch_layers=2,
            init="he_normal",
            norm="batch" if variant == "batchnorm" else "none",
        )
        net = build(spec, ctx.generator(17))
        if variant == "fixup":
            fixup_(net, generator=ctx.generator(18))
        results[variant] = ctx.train(net, epochs=epochs, lr=0.01, optimizer="sgd")
    accuracy = {
        k: (r.final.get("test_accuracy", 0.0) if r.status == "completed" else float("nan")) for k, r in results.items()
    }
    figure, (ax,) = subplots()
    plot_accuracy(ax, results, f"{blocks}-block residual MLP without and with normalization")
    trains = all(results[k].status == "completed" and accuracy[k] > 0.5 for k in ("fixup", "batchnorm"))
    plain_diverges = results["plain He"].status != "completed"

    def show(k):
        return f"{accuracy[k]:.2f}" if results[k].status == "completed" else "diverged"

    return ClaimResult(
        CLAIM,
        verdict(trains, plain_diverges),
        f"{blocks} residual blocks, no normalization: Fixup reaches {show('fixup')} held-out accuracy, BatchNorm "
        f"{show('batchnorm')}, plain He init {show('plain He')}.",
        numbers={"accuracy": accuracy, "status": {k: r.status for k, r in results.items()}},
        tables=[
            Table(
                f"After {epochs} epochs",
                ["variant", "status", "held-out accuracy"],
                [[k, r.status, show(k)] for k, r in results.items()],
            )
        ],
        figures=[Figure("Fixup trains without normalization", png(figure))],
        notes=results["plain He"].message if results["plain He"].status != "completed" else "",
    )
