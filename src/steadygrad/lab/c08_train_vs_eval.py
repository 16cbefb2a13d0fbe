"""Claim 8: BatchNorm behaves differently in training and evaluation; running averages make
single-example inference work."""

import torch

from steadygrad.lab.base import Claim, ClaimResult, Context, Table, fmt, verdict
from steadygrad.nets import NetSpec, build

CLAIM = Claim(
    8,
    "train-vs-eval",
    "BatchNorm behaves differently in training and evaluation; its running averages make single-example "
    "inference work.",
    "Ioffe & Szegedy 2015, section 3.1; the seed material",
    "Train a BatchNorm MLP on digits briefly; compare its outputs on the same batch in train and eval mode; "
    "predict the held-out set one example at a time in eval mode, and try one example in train mode.",
    "Train and eval outputs differ; one example in train mode is refused (one value per channel); one at a time in "
    "eval mode gives exactly the batched predictions.",
    "In training BN normalizes with the batch's own mean and variance, so an output depends on the batch; at "
    "inference it uses the running averages gathered in training, a fixed affine map that needs no batch.",
)


def run(ctx: Context) -> ClaimResult:
    net = build(NetSpec(depth=3, width=64, in_features=64, norm="batch"), ctx.generator(8))
    ctx.train(net, epochs=ctx.size(2, 1), lr=1e-3)
    x = ctx.digits.x_test
    with torch.no_grad():
        net.train()
        train_out = net(x[:64])
        refused = ""
        try:
            net(x[:1])
        except ValueError as error:
            refused = str(error)
        net.eval()
        eval_out = net(x[:64])
        batched = net(x).argmax(1)
        single = torch.cat([net(x[i : i + 1]).argmax(1) for i in range(len(x))])
        single_logits = torch.cat([net(x[i : i + 1]) for i in range(64)])
    difference = float((train_out - eval_out).abs().max())
    agree = float((single == batched).double().mean())
    logit_gap = float((single_logits - eval_out).abs().max())
    accuracy = float((batched == ctx.digits.y_test).double().mean())
    differs = difference > 1e-3
    single_works = agree == 1.0 and logit_gap < 1e-4 and bool(refused)
    return ClaimResult(
        CLAIM,
        verdict(differs, single_works),
        f"The same 64 examples give outputs up to {fmt(difference)} apart in train and eval mode. In eval mode, one "
        f"example at a time agrees with the batched predictions on {100 * agree:.0f}% of {len(x)} examples "
        f"(logits within {fmt(logit_gap)}); in train mode one example is refused.",
        numbers={
            "train_eval_difference": difference,
            "single_vs_batched_agreement": agree,
            "single_vs_batched_logit_gap": logit_gap,
            "accuracy": accuracy,
        },
        tables=[
            Table(
                "One network, two modes",
                ["measurement", "value"],
                [
                    ["max |train-mode output - eval-mode output| (same batch)", fmt(difference)],
                    ["eval: one-at-a-time == batched predictions", f"{100 * agree:.1f}%"],
                    ["eval: max logit gap, one-at-a-time vs batched", fmt(logit_gap)],
                    ["train mode on one example", (refused.split(";")[0] + ".") if refused else "accepted"],
                    ["held-out accuracy (eval mode)", f"{accuracy:.3f}"],
                ],
            )
        ],
    )
