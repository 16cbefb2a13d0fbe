"""``on_gradient``, the recorder's cheap gradient tap, against tensor hooks (torch's own way to see dL/dy)."""

import pytest
import torch

from steadygrad.measure.hooks import on_gradient


def _both(make):
    """The gradient on_gradient delivers and the one Tensor.register_hook delivers, for the same graph."""
    seen, expected = [], []
    x = torch.randn(6, 4, requires_grad=True)
    y, loss_of = make(x)
    on_gradient(y, seen.append)
    y.register_hook(expected.append)
    loss_of(y).backward()
    return seen, expected


CASES = {
    # y made by a node with one output
    "linear": lambda x: (x @ torch.ones(4, 3), lambda y: (y**2).sum()),
    # the second output of a multi-output node: its own index
    "chunk": lambda x: (x.chunk(2, dim=1)[1], lambda y: (y * torch.arange(12.0).reshape(6, 2)).sum()),
    # y used twice: the accumulated gradient, once
    "reused": lambda x: (x * 2, lambda y: (y**2).sum() + (3 * y).sum()),
    # a leaf: no node to attach to
    "leaf": lambda x: (x, lambda y: (y**3).sum()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_delivers_what_a_tensor_hook_delivers(case):
    seen, expected = _both(CASES[case])
    assert len(seen) == len(expected) == 1
    torch.testing.assert_close(seen[0], expected[0], rtol=0, atol=0)


def test_an_output_modified_in_place_afterwards_gives_the_gradient_at_the_hooked_value():
    # Conv -> BN -> ReLU(inplace=True): the hook on BN's output sees the gradient that reaches BN, as a
    # tensor hook registered at the same moment does
    x = torch.randn(6, 4, requires_grad=True)
    y = x * 1.5
    seen, expected = [], []
    on_gradient(y, seen.append)
    y.register_hook(expected.append)
    torch.relu_(y)
    y.sum().backward()
    torch.testing.assert_close(seen[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[0], (x.detach() * 1.5 > 0).float())


def test_merge_ranks_gives_the_global_batchs_accumulators():
    # two ranks' shares of one batch merge into what one process sees on the whole batch; each rank's mean loss
    # makes its gradients world times the global mean loss's, so the squares are divided by world^2
    from steadygrad.measure.hooks import RankSums, merge_ranks
    from steadygrad.measure.stats import activation_moments, gradient_moments, unit_moments

    g = torch.Generator().manual_seed(0)
    y = torch.randn(10, 6, generator=g, dtype=torch.float64).relu()
    y[:5, 2] = 0.0  # unit 2 is active on rank 1 only, unit 4 on neither
    y[:, 4] = 0.0
    grad = torch.randn(10, 6, generator=g, dtype=torch.float64)
    world = 2

    def share(part, part_grad):
        counts, active = unit_moments(part, "rectifier")
        return RankSums(activation_moments(part), counts, active, gradient_moments(part_grad * world))

    merged = merge_ranks([share(y[:5], grad[:5]), share(y[5:], grad[5:])])
    whole = activation_moments(y)
    assert torch.allclose(merged.activations, whole, rtol=1e-12, atol=1e-12)
    assert torch.equal(merged.unit_active, unit_moments(y, "rectifier")[1])
    assert merged.unit_active.tolist() == [True, True, True, True, False, True]
    assert torch.allclose(merged.gradients, gradient_moments(grad), rtol=1e-12)
    assert merge_ranks([share(y, grad)]).unit_counts is not None


def test_merge_ranks_refuses_no_ranks():
    from steadygrad.measure.hooks import merge_ranks

    with pytest.raises(ValueError, match="at least one rank"):
        merge_ranks([])


def test_the_recorder_is_switched_through_its_methods_only():
    # active, deferred and the gradient scale are read-only: arm/disarm and set_gradient_scale change them
    from torch import nn

    from steadygrad.measure.hooks import Recorder

    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    recorder = Recorder([("0", net[0]), ("2", net[2])])
    with pytest.raises(AttributeError):
        recorder.active = False
    recorder.disarm()
    net(torch.randn(5, 3))
    assert not recorder.active and recorder.empty and not net[0]._forward_hooks
    recorder.arm(deferred=False)
    net(torch.randn(5, 3))
    assert recorder.active and not recorder.deferred and not recorder.empty
    assert [recorder.layer_index(m) for m in (net[0], net[2])] == [0, 1]
    recorder.set_gradient_scale(1024.0)
    assert recorder.gradient_scale == 1024.0
    with pytest.raises(ValueError, match="positive finite"):
        recorder.set_gradient_scale(0.0)
    recorder.reset()
    assert recorder.gradient_scale == 1.0 and recorder.empty
    recorder.detach()
