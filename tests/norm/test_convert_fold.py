import pytest
import torch
from torch import nn

from steadygrad import norm


def torch_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),
        nn.GroupNorm(2, 8),
        nn.InstanceNorm2d(8, affine=True),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.BatchNorm1d(16, bias=False),
        nn.LayerNorm(16),
        nn.Linear(16, 4),
    )


def _train_a_little(model, steps=3):
    for _ in range(steps):
        model(torch.randn(8, 3, 6, 6) * 2 + 1).square().mean().backward()


def _norm_types(model):
    return [type(m) for m in model.modules() if "Norm" in type(m).__name__]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_conversion_both_ways_keeps_outputs_and_gradients(mode):
    model = torch_model()
    _train_a_little(model)
    model.train(mode == "train")
    ours = norm.convert_norms(model, to="steadygrad")
    assert all(t.__module__.startswith("steadygrad") for t in _norm_types(ours))
    assert all(t.__module__.startswith("torch") for t in _norm_types(model))  # the original is untouched
    back = norm.convert_norms(ours, to="torch")
    assert _norm_types(back) == _norm_types(model)
    x = torch.randn(4, 3, 6, 6)
    outputs = []
    for m in (model, ours, back):
        m.zero_grad()
        x_ = x.clone().requires_grad_(True)
        y = m(x_)
        y.square().sum().backward()
        outputs.append((y, x_.grad, [p.grad for p in m.parameters()], dict(m.named_buffers())))
    reference = outputs[0]
    for y, gx, gp, buffers in outputs[1:]:
        torch.testing.assert_close(y, reference[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, reference[1], rtol=1e-4, atol=1e-5)
        for a, b in zip(gp, reference[2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for name, buffer in reference[3].items():
            torch.testing.assert_close(buffers[name], buffer)
    assert ours.training == model.training


def test_state_dicts_are_interchangeable():
    model = torch_model()
    _train_a_little(model)
    ours = norm.convert_norms(model)
    assert list(ours.state_dict()) == list(model.state_dict())
    fresh = norm.convert_norms(torch_model())
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(fresh.state_dict())


def test_converting_a_single_layer_and_in_place():
    bn = nn.BatchNorm1d(5)
    assert type(norm.convert_norms(bn)) is norm.BatchNorm1d
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))
    same = norm.convert_norms(model, inplace=True)
    assert same is model and type(model[1]) is norm.BatchNorm1d


def test_bad_conversion_target():
    with pytest.raises(ValueError, match=r"Unknown conversion target 'jax'. Accepted: steadygrad, torch"):
        norm.convert_norms(nn.Linear(2, 2), to="jax")


@pytest.mark.parametrize("flavour", ["torch", "steadygrad"])
def test_folding_keeps_outputs_and_removes_every_batchnorm(flavour):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8, affine=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Sequential(nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16, bias=False), nn.Tanh()),
        nn.Linear(16, 3),
    )
    if flavour == "steadygrad":
        model = norm.convert_norms(model)
    for _ in range(5):  # running statistics far from (0, 1)
        model(torch.randn(32, 3, 8, 8) * 3 + 2)
    model.eval()
    folded = norm.fold_batchnorm(model)
    assert not any("BatchNorm" in type(m).__name__ for m in folded.modules())
    assert any("BatchNorm" in type(m).__name__ for m in model.modules())  # the original is untouched
    x = torch.randn(16, 3, 8, 8) * 3 + 2
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert folded[3].bias is not None  # a bias was created where the conv had none


def test_batchnorm_without_running_statistics_is_not_folded():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    folded = norm.fold_batchnorm(model)
    assert isinstance(folded[1], nn.BatchNorm1d)
