"""Claim 18: with BatchNorm the output is invariant to the scale of the preceding weights, so L2 weight
decay does not regularize them: it changes their effective learning rate."""

import statistics

import torch
import torch.nn.functional as F

from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    18,
    "bn-scale-invariance",
    "With BatchNorm the output is invariant to the scale of the preceding weights, so L2 weight decay does not "
    "regularize them; it only changes their effective learning rate.",
    'van Laarhoven 2017, "L2 Regularization versus Batch and Weight Normalization"',
    "(a) Multiply the weights before each BatchNorm of a trained MLP by c in {0.1, 10}: compare outputs and the "
    "weights' gradient. (b) Train the same net with and without weight decay: the weights' norm, the relative size "
    "of each update, and the accuracy.",
    "(a) Outputs unchanged to 1e-3 relative (BN's eps = 1e-5 is the only term that sees the scale) and the "
    "gradient scaled by 1/c. (b) Weight decay (0.5) shrinks the weights' norm by over 20% and makes each step's "
    "relative size ||dW||/||W|| (measured by steadygrad's Monitor) over 20% larger: a higher effective learning rate.",
    "BN(cWx) = BN(Wx), so the loss cannot see ||W|| and its gradient is orthogonal to W with size proportional to "
    "1/||W||. Decaying ||W|| therefore makes each SGD step relatively larger: an effective learning-rate schedule, "
    "not a constraint on the function.",
)


def _linears(net):
    return [block.linear for block in net.blocks]


def run(ctx: Context) -> ClaimResult:
    spec = NetSpec(depth=3, width=64, in_features=64, norm="batch", bias=False)
    net = build(spec, ctx.generator(19))
    ctx.train(net, epochs=1, lr=1e-3)
    x, y = ctx.digits.x_train[:256], ctx.digits.y_train[:256]
    net.train()

    def output_and_grad():
        net.zero_grad()
        out = net(x)
        F.cross_entropy(out, y).backward()
        return out.detach(), _linears(net)[1].weight.grad.norm().item()

    state = {k: v.clone() for k, v in net.state_dict().items()}
    base_out, base_grad = output_and_grad()
    rows, gaps, grad_ratios = [], [], []
    for c in (0.1, 10.0):
        net.load_state_dict(state)
        with torch.no_grad():
            for layer in _linears(net):
                layer.weight.mul_(c)
        out, grad = output_and_grad()
        gap = float((out - base_out).abs().max() / base_out.abs().max())
        gaps.append(gap)
        grad_ratios.append(grad / base_grad * c)  # 1 when the gradient scales as 1/c
        rows.append([f"x{c:g}", fmt(gap), f"{grad / base_grad:.4g}", f"{1 / c:g}"])
    net.load_state_dict(state)
    epochs = ctx.size(6, 2)
    decay = {}
    for wd in (0.0, 0.5):
        model = build(spec, ctx.generator(20))
        result = ctx.train(model, epochs=epochs, lr=1e-2, optimizer="sgd", weight_decay=wd, monitor_every=5)
        norm = sum(layer.weight.norm().item() ** 2 for layer in _linears(model)) ** 0.5
        ratios = [
            r.update_ratio
            for report in result.history[1:]
            for r in report.records
            if r.name == "block02" and r.update_ratio == r.update_ratio
        ]
        decay[wd] = (norm, result.final.get("test_accuracy", 0.0), statistics.median(ratios))
    figure, (ax,) = subplots()
    ax.bar(["no decay", "decay 0.5"], [decay[0.0][0], decay[0.5][0]], color=["gray", "tab:blue"])
    ax.set_ylabel("norm of the weights before BN")
    for i, wd in enumerate((0.0, 0.5)):
        ax.text(i, decay[wd][0], f"acc {decay[wd][1]:.2f}, step {decay[wd][2]:.2g}", ha="center", va="bottom")
    invariant = max(gaps) < 1e-3 and all(abs(r - 1) < 0.01 for r in grad_ratios)
    lr_only = decay[0.5][0] < 0.8 * decay[0.0][0] and decay[0.5][2] > 1.2 * decay[0.0][2]
    return ClaimResult(
        CLAIM,
        verdict(invariant, lr_only),
        f"Scaling the weights before BN by 0.1 or 10 changes the output by at most {fmt(max(gaps))} (relative) and "
        f"divides the gradient by the same factor (to {100 * max(abs(r - 1) for r in grad_ratios):.2g}%). Weight decay "
        f"shrinks the weights' norm from {decay[0.0][0]:.3g} to {decay[0.5][0]:.3g} and makes each step relatively "
        f"larger (median ||dW||/||W|| {decay[0.0][2]:.2g} -> {decay[0.5][2]:.2g}); accuracy {decay[0.0][1]:.2f} -> "
        f"{decay[0.5][1]:.2f}.",
        numbers={
            "output_gap": gaps,
            "gradient_scale_vs_1_over_c": grad_ratios,
            "weight_decay": {str(k): {"weight_norm": v[0], "accuracy": v[1]} for k, v in decay.items()},
        },
        tables=[
            Table(
                "Scaling the weights before BatchNorm",
                ["scale c", "output change (relative)", "gradient / original", "1/c"],
                rows,
            )
        ],
        figures=[Figure("Weight decay shrinks the weights, not the function", png(figure))],
    )
