"""Claim 23: under the standard parametrization activations grow with width after a few steps; under μP they
stay flat (the coordinate check)."""

from steadygrad.coord import coord_check
from steadygrad.lab.base import Claim, ClaimResult, Context, Figure, Table, fmt, verdict
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    23,
    "mup",
    "Trained with Adam for a few steps at one learning rate, a standard-parametrized MLP's hidden and output "
    "activations grow with width, while under μP every layer's activation size stays flat.",
    'Yang et al. 2021, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer"',
    "4-block ReLU MLPs on digits at widths 64-512 (quick: 32-128), Adam lr 1e-2, 3 steps on one batch of 128: "
    "steadygrad.coord_check on NetSpec(parametrization='standard') and NetSpec(parametrization='mup') (a "
    "zero-initialized head, learning rate lr * 64 / width for the hidden layers and the head).",
    "The standard parametrization's check is not flat (some layer group grows like width^a with a >= 0.25); "
    "μP's is flat (|a| < 0.25 for every group).",
    "Adam moves every entry of an n-wide weight matrix by about lr per step, in a direction correlated with the "
    "layer's input, so the layer's output moves by about lr * n: a learning rate tuned at one width blows up at "
    "a larger one. μP scales each layer's rate by 1/fan_in, so one rate is right at every width.",
)


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
    sp_grows = bool(standard.growing)
    mup_flat = mup.flat
    worst = max(standard.slopes.values())
    flattest = max(abs(a) for a in mup.slopes.values())
    return ClaimResult(
        CLAIM,
        verdict(sp_grows, mup_flat),
        f"After 3 Adam steps the standard parametrization's steepest layer group grows like width^{fmt(worst)}; "
        f"under μP the steepest |slope| is {fmt(flattest)}.",
        numbers={"standard_slopes": standard.slopes, "mup_slopes": mup.slopes, "widths": widths},
        tables=[
            Table(
                "Slope a of activation size ~ width^a at the last step",
                ["layer group", "standard", "μP"],
                [[g, fmt(standard.slopes[g]), fmt(mup.slopes.get(g, float("nan")))] for g in standard.slopes],
            )
        ],
        figures=[
            Figure("Coordinate check: standard parametrization", standard.figure().png, standard.verdict),
            Figure("Coordinate check: μP", mup.figure().png, mup.verdict),
        ],
        notes="The other half of the claim, that the best learning rate transfers across widths under μP, is not "
        "measured by this experiment.",
    )
