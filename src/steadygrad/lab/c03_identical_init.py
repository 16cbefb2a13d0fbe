"""Claim 3: identical initial weights are never differentiated by training; random ones are."""

from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, plot_accuracy, png, subplots, verdict
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    3,
    "identical-init",
    "Identical initial weights are never differentiated by training (symmetry is never broken); random ones are.",
    "The seed material; Rumelhart, Hinton, Williams 1986",
    "Train a 3-layer tanh MLP on digits with every unit's weights identical (steadygrad.init.identical_), and "
    "with He init, for the same steps.",
    "After training, the identical net's hidden units still have identical weights (spread below 1e-6) and it "
    "learns little; the random net's units differ and it learns.",
    "Units that start equal compute the same output and receive the same gradient, so they stay equal: a layer "
    "of N identical units is worth one unit. Random initialization breaks the symmetry.",
)


def _spread(net) -> float:
    """Largest difference between any hidden unit's incoming weights and the first unit's, over hidden layers."""
    spreads = []
    for block in net.blocks:
        w = block.linear.weight.detach()
        spreads.append(float((w - w[:1]).abs().max()))
    return max(spreads)


def run(ctx: Context) -> ClaimResult:
    epochs = ctx.size(5, 2)
    results, nets = {}, {}
    for init in ("identical", "he_normal"):
        net = build(NetSpec(depth=3, width=32, in_features=64, activation="tanh", init=init), ctx.generator(4))
        results[init] = ctx.train(net, epochs=epochs, lr=0.05, optimizer="momentum")
        nets[init] = net
    spread = {k: _spread(n) for k, n in nets.items()}
    acc = {k: r.final["test_accuracy"] for k, r in results.items()}
    figure, (ax,) = subplots()
    plot_accuracy(ax, results)
    never_differentiated = spread["identical"] < 1e-6
    random_differs = spread["he_normal"] > 1e-2 and acc["he_normal"] > acc["identical"] + 0.2
    return ClaimResult(
        CLAIM,
        verdict(never_differentiated, random_differs),
        f"After {epochs} epochs the identical net's hidden units differ by at most {fmt(spread['identical'])} "
        f"(accuracy {acc['identical']:.2f}); the He-initialized net's by {fmt(spread['he_normal'])} (accuracy "
        f"{acc['he_normal']:.2f}).",
        numbers={"spread": spread, "accuracy": acc},
        tables=[
            Table(
                "After training",
                ["init", "max unit weight difference", "held-out accuracy"],
                [[k, fmt(spread[k]), f"{acc[k]:.3f}"] for k in spread],
            )
        ],
        figures=[Figure("Held-out accuracy while training", png(figure))],
    )
