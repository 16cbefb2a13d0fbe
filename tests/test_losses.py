"""steadygrad.losses: one loss resolution, checked against torch.nn.functional."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from steadygrad.losses import first_tensor, projection_loss, resolve_loss, task_loss


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
