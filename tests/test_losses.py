"""steadygrad.losses: one loss resolution, checked against torch.nn.functional."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from steadygrad.losses import (
    LOSS_KINDS,
    first_tensor,
    projection_loss,
    resolve_loss,
    resolve_loss_named,
    task_loss,
    tensors,
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_classification_is_cross_entropy_on_the_first_float_output(gen):
    logits = torch.randn(8, 5, generator=gen)
    targets = torch.randint(0, 5, (8,), generator=gen)
    expected = F.cross_entropy(logits, targets)
    torch.testing.assert_close(task_loss(logits, targets), expected)
    torch.testing.assert_close(task_loss((torch.arange(3), {"logits": logits}), targets, "classification"), expected)


def test_classification_takes_per_position_logits(gen):
    logits = torch.randn(4, 7, 6, generator=gen)  # (N, C, T)
    targets = torch.randint(0, 7, (4, 6), generator=gen)
    torch.testing.assert_close(task_loss(logits, targets), F.cross_entropy(logits, targets))


def test_regression_reshapes_or_broadcasts_targets(gen):
    y = torch.randn(8, 1, generator=gen)
    t = torch.randn(8, generator=gen)
    torch.testing.assert_close(task_loss(y, t), F.mse_loss(y, t.reshape(8, 1)))
    wide = torch.randn(8, 3, generator=gen)
    torch.testing.assert_close(task_loss(wide, t[:3], "regression"), F.mse_loss(wide, t[:3].expand(8, 3)))


@pytest.mark.parametrize(
    ("output", "targets", "task", "match"),
    [
        (torch.randn(4, 3), torch.randn(4), "classification", "integer class indices"),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), None, r"output \(4, 3\) .* targets \(5,\).*loss="),
        (torch.arange(4), torch.zeros(4), None, "no floating-point tensor"),
        (torch.randn(4, 3), torch.zeros(4), "ranking", "task must be one of"),
    ],
    ids=["float-class-targets", "batch-mismatch", "no-float-output", "unknown-task"],
)
def test_bad_input_is_explained(output, targets, task, match):
    with pytest.raises(ValueError, match=match):
        task_loss(output, targets, task)


def test_projection_gradient_is_r_over_n():
    y = torch.randn(6, 4, requires_grad=True)
    projection_loss(y, seed=3).backward()
    r = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(y.grad, r / 6)
    # the same seed gives the same loss: probes are reproducible
    torch.testing.assert_close(projection_loss(y, seed=3), projection_loss(y, seed=3))


def test_resolution_order(gen):
    y = torch.randn(4, 3, generator=gen, requires_grad=True)
    t = torch.randint(0, 3, (4,), generator=gen)
    assert resolve_loss(y, t, loss=lambda out, targets: out.sum() * 0 + 7.0).item() == 7.0
    assert resolve_loss(y, None, loss=lambda out: out.sum() * 0 + 5.0).item() == 5.0
    torch.testing.assert_close(resolve_loss(y, t), F.cross_entropy(y, t))
    torch.testing.assert_close(resolve_loss(y, None, seed=1), projection_loss(y, seed=1))
    assert first_tensor([torch.arange(2), y]) is y


# ---- sequences, the model's own loss, named outputs --------------------------------------------------


def test_sequence_logits_take_per_position_cross_entropy(gen):
    logits = torch.randn(3, 5, 11, generator=gen)  # (N, T, C), as language models return them
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    value, name = resolve_loss_named(logits, targets)
    torch.testing.assert_close(value, F.cross_entropy(logits.reshape(15, 11), targets.reshape(15)))
    assert name.startswith("cross-entropy (N, T, C)")


def test_targets_of_minus_100_are_left_out(gen):
    logits = torch.randn(2, 6, 9, generator=gen)
    targets = torch.randint(0, 9, (2, 6), generator=gen)
    targets[0, :2] = -100
    targets[1, 5] = -100
    kept = targets != -100
    expected = F.cross_entropy(logits[kept], targets[kept])  # the kept positions alone, no ignore_index
    torch.testing.assert_close(task_loss(logits, targets), expected)


def test_the_models_own_scalar_loss_comes_before_the_targets(gen):
    logits = torch.randn(4, 3, generator=gen)
    own = torch.tensor(0.25)
    targets = torch.randint(0, 3, (4,), generator=gen)
    assert resolve_loss_named({"loss": own, "logits": logits}, targets) == (own, "the model's own loss (output.loss)")
    assert resolve_loss_named(Prediction(logits, own))[0] is own  # an attribute, on a dataclass
    # a per-example loss is not "the" loss: the targets decide
    value, name = resolve_loss_named({"loss": torch.ones(4), "logits": logits}, targets)
    torch.testing.assert_close(value, F.cross_entropy(logits, targets))
    assert name.startswith("cross-entropy (N, C)")


@dataclass
class Prediction:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden: tuple = ()


def test_logits_are_the_prediction_and_loss_never_is(gen):
    logits, hidden = torch.randn(4, 3, generator=gen), torch.randn(4, 8, generator=gen)
    loss = torch.tensor(1.0)
    assert first_tensor({"loss": loss, "hidden": hidden, "logits": logits}) is logits
    assert first_tensor({"loss": loss, "hidden": hidden}) is hidden
    assert first_tensor(Prediction(logits, loss, (hidden,))) is logits
    found = tensors(Prediction(logits, loss, (hidden,)))
    assert len(found) == 3 and all(t is u for t, u in zip(found, [logits, loss, hidden], strict=True))


@pytest.mark.parametrize(
    ("output", "targets"),
    [
        (torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long)),  # one position short
        (torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.long)),  # per-position targets for (N, C) logits
        (torch.randn(4, 3), torch.zeros(5)),  # regression: neither as many values nor broadcastable
    ],
    ids=["sequence", "rank", "regression"],
)
def test_a_shape_mismatch_names_both_shapes_and_the_remedy(output, targets):
    with pytest.raises(ValueError, match="loss=") as caught:
        resolve_loss(output, targets)
    message = str(caught.value)
    assert str(tuple(output.shape)) in message and str(tuple(targets.shape)) in message
    assert caught.value.__context__ is None or caught.value.__suppress_context__  # no torch error beneath it


def test_every_rule_names_its_loss(gen):
    y = torch.randn(4, 3, generator=gen, requires_grad=True)
    names = [
        resolve_loss_named(y, None, loss=lambda out: out.sum())[1],
        resolve_loss_named({"loss": y.sum(), "logits": y})[1],
        resolve_loss_named(y, torch.zeros(4, dtype=torch.long))[1],
        resolve_loss_named(y, torch.zeros(4, 3))[1],
        resolve_loss_named(y)[1],
    ]
    assert [next(k for k in LOSS_KINDS if n.startswith(k)) for n in names] == list(LOSS_KINDS)
    assert names[0] == "loss= test_every_rule_names_its_loss.<locals>.<lambda>"
    assert names[-1] == "random projection of the outputs (seed 0)"


def test_square_sequence_logits_read_as_n_t_c_and_narrow_integer_targets_count(gen):
    logits = torch.randn(2, 4, 4, generator=gen)  # C == T: (N, T, C) and (N, C, T) both fit; the former is taken
    targets = torch.randint(0, 4, (2, 4), generator=gen)
    expected = F.cross_entropy(logits.reshape(8, 4), targets.reshape(8))
    torch.testing.assert_close(task_loss(logits, targets), expected)
    torch.testing.assert_close(task_loss(logits, targets.to(torch.int32)), expected)
