"""Claim 5: Glorot suits tanh, He suits ReLU: a deep ReLU MLP trains with He and stalls with Glorot."""

from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, plot_accuracy, png, subplots, verdict
from steadygrad.measure import probe
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    5,
    "he-vs-glorot",
    "Glorot suits tanh, He suits ReLU: a 30-layer ReLU MLP trains with He initialization and stalls with Glorot.",
    "He, Zhang, Ren, Sun 2015, fig. 3 (a 30-layer ReLU net converges with their init and not with Glorot's)",
    "A 30-layer, width-64 ReLU MLP on digits, Adam at lr 1e-3, He-normal versus Glorot-normal; and the gradient "
    "reaching its first layer at initialization.",
    "He reaches a clearly higher held-out accuracy than Glorot after the same epochs; Glorot's first-layer "
    "gradient is orders of magnitude smaller.",
    "Glorot's variance 2/(fan_in + fan_out) = 1/n assumes a linear activation; ReLU zeroes half its inputs, so "
    "each layer halves the signal's second moment: 2^-30 after 30 layers. He's 2/n restores it.",
)


def run(ctx: Context) -> ClaimResult:
    epochs = ctx.size(8, 2)
    results, ratios = {}, {}
    for init in ("he_normal", "glorot_normal"):
        spec = NetSpec(depth=30, width=64, in_features=64, activation="relu", init=init)
        net = build(spec, ctx.generator(5))
        ratios[init] = probe(net, ctx.digits.x_train[:256], ctx.digits.y_train[:256]).gradient_ratio
        results[init] = ctx.train(net, epochs=epochs, lr=1e-3, optimizer="adam")
    acc = {k: r.final.get("test_accuracy", 0.0) for k, r in results.items()}
    figure, (ax,) = subplots()
    plot_accuracy(ax, results, "30-layer ReLU MLP on digits")
    he_trains = acc["he_normal"] > acc["glorot_normal"] + 0.15
    glorot_starves = ratios["glorot_normal"] < 1e-2 * ratios["he_normal"]
    return ClaimResult(
        CLAIM,
        verdict(he_trains, glorot_starves),
        f"After {epochs} epochs: He {acc['he_normal']:.2f} held-out accuracy, Glorot {acc['glorot_normal']:.2f}. At "
        f"initialization the first layer's gradient is {ratios['he_normal']:.2g} (He) versus "
        f"{ratios['glorot_normal']:.2g} (Glorot) of the last layer's.",
        numbers={"accuracy": acc, "gradient_ratio_at_init": ratios},
        tables=[
            Table(
                "30-layer ReLU MLP",
                ["init", "first/last gradient at init", "held-out accuracy"],
                [[k, f"{ratios[k]:.3g}", f"{acc[k]:.3f}"] for k in acc],
            )
        ],
        figures=[Figure("Held-out accuracy while training", png(figure))],
    )
