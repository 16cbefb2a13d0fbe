"""Claim 23: under the standard parametrization activations grow with width after a few steps and the best
learning rate shifts with width; under μP activations stay flat and the best learning rate transfers."""

import math

import torch
import torch.nn.functional as F

from steadygrad.coord import coord_check
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, png, subplots, verdict
from steadygrad.nets import NetSpec, build
from steadygrad.optimizers import param_groups

CLAIM = Claim(
    23,
    "mup",
    "Trained with Adam for a few steps at one learning rate, a standard-parametrized MLP's or transformer's hidden "
    "and output activations grow with width, while under μP every layer's activation size stays flat; and μP's "
    "best learning rate is the same at every width, while the standard parametrization's shifts.",
    'Yang et al. 2021, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer"',
    "4-block ReLU MLPs on digits. Coordinate check: widths 64-512 (quick: 32-128), Adam lr 1e-2, 3 steps on one "
    "batch of 128, steadygrad.coord_check on NetSpec(parametrization='standard') and NetSpec(parametrization='mup') "
    "(a zero-initialized head, learning rate lr * 64 / width for the hidden layers and the head); the same for 2-block "
    "transformers at widths 32-256 on random tokens, μP with 1/head_dim attention. Learning-rate "
    "transfer: widths 64 and 512 (quick: 32 and 128), Adam at lr 1e-3 to 1e-1 in half-decade steps, 60 steps "
    "(quick 40) of batches of 128; the training loss over the last 10 steps, averaged over 2 seeds (quick 1).",
    "For both families the standard parametrization's check is not flat (some layer group grows like width^a with "
    "a >= 0.25); μP's is flat (|a| < 0.25 for every group). μP's best learning rate is the same grid point at "
    "both widths; the standard parametrization's moves to a smaller one at the larger width.",
    "Adam moves every entry of an n-wide weight matrix by about lr per step, in a direction correlated with the "
    "layer's input, so the layer's output moves by about lr * n: a learning rate tuned at one width blows up at "
    "a larger one. μP scales each layer's rate by 1/fan_in, so one rate is right at every width.",
)

LRS = [10**e for e in (-3.0, -2.5, -2.0, -1.5, -1.0)]


def final_loss(ctx: Context, parametrization: str, width: int, lr: float, steps: int) -> float:
    """The training loss over the last 10 of ``steps`` Adam steps, averaged over the context's seeds (2; quick 1);
    inf when it is not finite."""
    seeds = ctx.seeds(2)
    return sum(_final_loss(ctx, parametrization, width, lr, steps, seed) for seed in seeds) / len(seeds)


def _final_loss(ctx: Context, parametrization: str, width: int, lr: float, steps: int, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed * 7919 + 23)
    net = build(NetSpec(depth=4, width=width, in_features=64, parametrization=parametrization), generator)
    optimizer = torch.optim.Adam(param_groups(net, lr))
    x, y = ctx.digits.x_train, ctx.digits.y_train
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, len(x), (128,), generator=generator)
        loss = F.cross_entropy(net(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    tail = sum(losses[-10:]) / 10
    return tail if math.isfinite(tail) else math.inf


def run(ctx: Context) -> ClaimResult:
    widths = ctx.size([64, 128, 256, 512], [32, 64, 128])
    data = (ctx.digits.x_train[:128], ctx.digits.y_train[:128])
    checks = {}
    for parametrization in ("standard", "mup"):

        def family(width, parametrization=parametrization):
            spec = NetSpec(depth=4, width=width, in_features=64, parametrization=parametrization)
            return build(spec)

        checks[parametrization] = coord_check(
            family, widths, steps=3, data=data, optimizer="adam", lr=1e-2, seed=ctx.seed
        )
    standard, mup = checks["standard"], checks["mup"]
    base = NetSpec(kind="transformer", depth=2, width=32, heads=4, seq_len=16, vocab=64, base_width=32)
    tokens = base.example_batch(16, ctx.generator(24))
    lm = {
        p: coord_check(
            lambda w, p=p: build(base.replace(width=w, parametrization=p)),
            [32, 64, 128, 256],
            steps=3,
            data=tokens,
            optimizer="adam",
            lr=1e-2,
            seed=ctx.seed,
        )
        for p in ("standard", "mup")
    }
    sp_grows = bool(standard.growing) and bool(lm["standard"].growing)
    mup_flat = mup.flat and lm["mup"].flat
    worst = max(standard.slopes.values())
    flattest = max(abs(a) for a in mup.slopes.values())

    transfer_widths = ctx.size([64, 512], [32, 128])
    steps = ctx.size(60, 40)
    losses = {
        (p, w): [final_loss(ctx, p, w, lr, steps) for lr in LRS] for p in ("standard", "mup") for w in transfer_widths
    }
    best = {key: LRS[min(range(len(LRS)), key=values.__getitem__)] for key, values in losses.items()}
    narrow, wide = transfer_widths
    mup_transfers = best[("mup", narrow)] == best[("mup", wide)]
    sp_shifts = best[("standard", wide)] < best[("standard", narrow)]

    figure, axes = subplots(2)
    for ax, parametrization in zip(axes, ("standard", "mup"), strict=True):
        for width in transfer_widths:
            values = losses[(parametrization, width)]
            ax.plot(LRS, [v if math.isfinite(v) else float("nan") for v in values], "o-", label=f"width {width}")
            ax.plot(best[(parametrization, width)], min(values), "k*", markersize=12)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Adam learning rate")
        ax.set_ylabel(f"training loss, last 10 of {steps} steps")
        ax.set_title({"standard": "Standard parametrization", "mup": "μP"}[parametrization] + " (★: best)")
        ax.legend(fontsize=8)
    return ClaimResult(
        CLAIM,
        verdict(sp_grows, mup_flat, mup_transfers, sp_shifts),
        f"After 3 Adam steps the standard parametrization's steepest layer group grows like width^{fmt(worst)}; "
        f"under μP the steepest |slope| is {fmt(flattest)}. A 2-block transformer's steepest group: standard "
        f"width^{fmt(max(lm['standard'].slopes.values()))}, μP |slope| "
        f"{fmt(max(abs(a) for a in lm['mup'].slopes.values()))}. Best learning rate at widths {narrow} and {wide}: "
        f"standard {best[('standard', narrow)]:.2g} and {best[('standard', wide)]:.2g}, μP "
        f"{best[('mup', narrow)]:.2g} and {best[('mup', wide)]:.2g}.",
        numbers={
            "standard_slopes": standard.slopes,
            "mup_slopes": mup.slopes,
            "transformer_standard_slopes": lm["standard"].slopes,
            "transformer_mup_slopes": lm["mup"].slopes,
            "widths": widths,
            "learning_rates": LRS,
            "final_loss": {f"{p} width {w}": values for (p, w), values in losses.items()},
            "best_lr": {f"{p} width {w}": lr for (p, w), lr in best.items()},
        },
        tables=[
            Table(
                "Slope a of activation size ~ width^a at the last step",
                ["layer group", "standard", "μP"],
                [[g, fmt(standard.slopes[g]), fmt(mup.slopes.get(g, float("nan")))] for g in standard.slopes],
            ),
            Table(
                f"Training loss after {steps} steps, by Adam learning rate",
                ["parametrization, width", *(f"{lr:.2g}" for lr in LRS), "best"],
                [[f"{p}, {w}", *(fmt(v) for v in values), f"{best[(p, w)]:.2g}"] for (p, w), values in losses.items()],
            ),
        ],
        figures=[
            Figure("Coordinate check: standard parametrization", standard.figure().png, standard.verdict),
            Figure("Coordinate check: μP", mup.figure().png, mup.verdict),
            Figure(
                "Coordinate check of a 2-block transformer: standard",
                lm["standard"].figure().png,
                lm["standard"].verdict,
            ),
            Figure("Coordinate check of a 2-block transformer: μP", lm["mup"].figure().png, lm["mup"].verdict),
            Figure("Learning-rate transfer across width", png(figure)),
        ],
    )
