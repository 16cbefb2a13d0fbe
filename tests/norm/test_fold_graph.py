"""fold_batchnorm on the executed graph: a torchvision-style ResNet written by hand (named children, a
residual add, a downsample), models fx cannot trace, and the BatchNorms that must be left, with reasons.
The reference is the unfolded model's eval output in float64."""

import pytest
import torch
from torch import nn

from steadygrad import norm
from tests.zoo import BasicBlock  # torchvision's, with fx-untraceable control flow on request


class ResNet(nn.Module):
    def __init__(self, dynamic=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, dynamic=dynamic), BasicBlock(8, 8, dynamic=dynamic))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, dynamic=dynamic), BasicBlock(16, 16, dynamic=dynamic))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def with_statistics(model, *shape):
    """Running statistics and affine parameters far from (0, 1), then eval mode, all in float64."""
    model = model.double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2.0, generator=g)
                m.bias.normal_(0.0, 1.0, generator=g)
        model.train()
        for _ in range(3):
            model(torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1)
    return model.eval()


def batchnorms(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def assert_same_outputs(model, folded, *shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 + 1
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_resnet_folds_completely_with_unchanged_outputs():
    model = with_statistics(ResNet(), 4, 3, 32, 32)
    result = norm.fold_batchnorm_report(model)
    assert result.method == "fx"
    assert batchnorms(result.model) == []
    assert result.not_folded == []
    assert len(result.folded) == len(batchnorms(model)) == 1 + 2 * 4 + 1
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in result.folded
    assert ("layer1.1.conv2", "layer1.1.bn2") in result.folded
    assert isinstance(result.model.layer1[0].bn1, nn.Identity)
    assert result.model.layer1[0].conv1.bias is not None  # created where the conv had none
    assert_same_outputs(model, result.model, 2, 3, 32, 32)
    assert len(batchnorms(model)) == 10  # the user's model is untouched


def test_untraceable_model_folds_from_the_recorded_calls():
    model = with_statistics(ResNet(dynamic=True), 4, 3, 32, 32)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    result = norm.fold_batchnorm_report(model, example_inputs=x)
    assert result.method == "hooks"
    assert batchnorms(result.model) == [] and result.not_folded == []
    assert_same_outputs(model, result.model, 2, 3, 32, 32)


def test_untraceable_model_without_inputs_folds_only_sequential_children():
    model = with_statistics(ResNet(dynamic=True), 4, 3, 32, 32)
    result = norm.fold_batchnorm_report(model)
    assert result.method == "sequential"
    assert result.folded == [("layer2.0.downsample.0", "layer2.0.downsample.1")]
    assert len(result.not_folded) == 9
    assert all("torch.fx cannot trace the model (TraceError)" in reason for _, reason in result.not_folded)
    assert_same_outputs(model, result.model, 2, 3, 32, 32)


class AfterAdd(nn.Module):
    """A BatchNorm after an addition, one on the model's input, and a conv whose output has two users."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn_sum, self.bn_input, self.bn_shared = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.dynamic = False

    def forward(self, x):
        if self.dynamic and bool(x.sum() > 1e9):
            x = -x
        s = self.bn_sum(self.a(x) + self.b(x))
        c = self.c(s)
        return self.bn_shared(c) + c + self.bn_input(x)


@pytest.mark.parametrize("dynamic", [False, True])
def test_batchnorms_that_cannot_be_folded_are_listed_with_their_reason(dynamic):
    model = AfterAdd()
    model.dynamic = dynamic
    model = with_statistics(model, 8, 4, 6, 6)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    result = norm.fold_batchnorm_report(model, example_inputs=x)
    assert result.method == ("hooks" if dynamic else "fx")
    assert result.folded == []
    reasons = dict(result.not_folded)
    assert set(reasons) == {"bn_sum", "bn_input", "bn_shared"}
    if dynamic:  # the recorded calls: the sum is not the output of b, called just before it
        assert "its input is not the output of the layer called just before it" in reasons["bn_sum"]
        assert "its input is not the output of the layer called just before it" in reasons["bn_input"]
    else:
        assert reasons["bn_sum"].startswith("its input comes from add (call_function), not from a Linear")
        assert reasons["bn_input"].startswith("its input comes from the model's input 'x', not from a Linear")
    assert reasons["bn_shared"].startswith("the output of c also feeds")
    assert len(batchnorms(result.model)) == 3
    assert_same_outputs(model, result.model, 2, 4, 6, 6)


class Mixed(nn.Module):
    """Named children outside any Sequential: Linear + BatchNorm1d, a grouped ConvTranspose2d + BatchNorm2d,
    and a conv called twice."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(6)
        self.twice = nn.Conv2d(6, 6, 1)
        self.bn_twice = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)
        self.bn_fc = nn.BatchNorm1d(3)

    def forward(self, x):
        h = torch.relu(self.bn_up(self.up(x)))
        h = self.bn_twice(self.twice(self.twice(h)))
        return self.bn_fc(self.fc(h.mean((2, 3))))


def test_linear_and_transposed_conv_fold_and_a_reused_layer_is_listed():
    model = with_statistics(Mixed(), 8, 4, 5, 5)
    result = norm.fold_batchnorm_report(model)
    assert result.folded == [("up", "bn_up"), ("fc", "bn_fc")]
    assert result.not_folded == [("bn_twice", "twice is called 2 times: folding would change every call")]
    assert_same_outputs(model, result.model, 3, 4, 5, 5)


def test_fold_batchnorm_still_returns_the_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    folded = norm.fold_batchnorm(model)
    assert isinstance(folded, nn.Sequential) and isinstance(folded[1], nn.Identity)


class SequenceLinear(nn.Module):
    """A Linear on (N, L, F) before a BatchNorm1d(L) with L equal to its output units: not a foldable pair."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.dynamic = True

    def forward(self, x):
        if self.dynamic and bool(x.sum() > 1e9):
            x = -x
        return self.bn(self.fc(x))


def test_recorded_calls_refuse_a_linear_whose_output_is_not_2d():
    model = with_statistics(SequenceLinear(), 8, 4, 3)
    result = norm.fold_batchnorm_report(model, example_inputs=torch.randn(2, 4, 3, dtype=torch.float64))
    assert result.method == "hooks" and result.folded == []
    assert result.not_folded == [("bn", "fc's output has 3 dims: BatchNorm1d normalizes dim 1, not its features")]
    assert_same_outputs(model, result.model, 2, 4, 3)


class Tied(nn.Module):
    """a -> bn -> b (an nn.Sequential) with b's weight tied to a's: folding bn into a would rescale b's weight
    too. ``dynamic``: control flow on a value, so fx cannot trace it."""

    def __init__(self, dynamic=False):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
        self.seq[2].weight = self.seq[0].weight
        self.dynamic = dynamic

    def forward(self, x):
        if self.dynamic and bool(x.sum() > 1e9):
            x = -x
        return self.seq(x)


@pytest.mark.parametrize("method", ["fx", "hooks", "sequential"])
def test_a_layer_whose_weight_is_tied_to_another_is_not_folded(method):
    model = with_statistics(Tied(dynamic=method != "fx"), 8, 4)
    inputs = torch.randn(2, 4, dtype=torch.float64) if method == "hooks" else None
    result = norm.fold_batchnorm_report(model, example_inputs=inputs)
    assert result.method == method and result.folded == []
    reason = "seq.0.weight is shared with seq.2 (tied weights): folding would change that layer too"
    assert result.not_folded == [("seq.1", reason)]
    assert_same_outputs(model, result.model, 8, 4)


def test_a_layer_registered_under_two_names_is_still_folded():
    """One module under two names holds its weight alone: not tied."""
    model = Tied()
    model.seq[2] = nn.Linear(4, 4)
    model.alias = model.seq[0]
    model = with_statistics(model, 8, 4)
    result = norm.fold_batchnorm_report(model)
    assert result.folded == [("seq.0", "seq.1")]
    assert_same_outputs(model, result.model, 8, 4)
