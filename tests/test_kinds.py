"""steadygrad.kinds: one table per concept, resolved by name, class or instance."""

import math

import pytest
import torch
from torch import nn

import steadygrad as sg
from steadygrad import kinds
from steadygrad.init import calculate_gain


def test_resolution_by_name_class_and_instance_agree():
    for which in ("tanh", nn.Tanh, nn.Tanh()):
        kind = kinds.activation(which)
        assert kind.name == "tanh" and kind.family == "saturating" and kind.saturation == "tanh"
    assert kinds.activation("no_such_activation") is None
    assert kinds.activation(nn.Linear(2, 2)) is None


def test_most_specific_class_wins():
    # torch derives ReLU6 from Hardtanh: it is a rectifier, not a saturating unit
    assert issubclass(nn.ReLU6, nn.Hardtanh)
    assert kinds.activation(nn.ReLU6()).family == "rectifier"
    assert kinds.activation(nn.Hardtanh()).family == "saturating"

    class MyReLU(nn.ReLU):
        pass

    assert kinds.activation(MyReLU()).name == "relu"


def test_weight_layer_families():
    assert kinds.weight_family(nn.ConvTranspose2d(2, 3, 3)) == "conv"
    assert kinds.weight_family(nn.Conv1d(2, 3, 3)) == "conv"
    assert kinds.weight_family(nn.LSTM(2, 3)) == "recurrent"
    assert kinds.weight_family(nn.Embedding(5, 3)) == "embedding"
    assert kinds.weight_family(nn.Tanh()) is None
    affine = kinds.weight_layer_types(*kinds.AFFINE)
    assert isinstance(nn.Linear(2, 2), affine) and not isinstance(nn.Embedding(2, 2), affine)


def test_norms_of_torch_and_steadygrad_are_norms():
    for module, family in [
        (nn.BatchNorm2d(3), "batch"),
        (sg.norm.BatchNorm1d(3), "batch"),
        (nn.InstanceNorm2d(3), "instance"),
        (sg.norm.InstanceNorm2d(3), "instance"),
        (nn.LayerNorm(3), "layer"),
        (sg.norm.LayerNorm(3), "layer"),
        (nn.GroupNorm(1, 3), "group"),
        (sg.norm.GroupNorm(1, 3), "group"),
    ]:
        assert kinds.norm_family(module) == family, type(module)
    assert isinstance(sg.norm.GroupNorm(1, 3), kinds.norm_types())


def test_gains_are_torch_gains_where_torch_has_them():
    for name in ("sigmoid", "tanh", "relu", "selu", "identity"):
        gain, param = kinds.activation(name).gain_of(kinds.activation(name).module())
        assert calculate_gain(gain, param) == pytest.approx(torch.nn.init.calculate_gain(gain, param))
    slope = kinds.activation(nn.LeakyReLU(0.2)).gain_of(nn.LeakyReLU(0.2))
    assert slope == ("leaky_relu", 0.2)


def test_registering_a_kind_is_one_line():
    class Conv1D(nn.Module):  # HF's GPT-2 projection: y = x W + b, a dense layer
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 3))

    assert kinds.weight_family(Conv1D()) is None
    kinds.register_weight_layer(Conv1D, "dense")
    try:
        assert kinds.weight_family(Conv1D()) == "dense"
        assert Conv1D in kinds.weight_layer_types("dense")
    finally:
        kinds._WEIGHT_LAYERS.pop(Conv1D)


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="accepted are dense, conv"):
        kinds.register_weight_layer(nn.Linear, "fully_connected")
    with pytest.raises(ValueError, match="Unknown normalization family"):
        kinds.norm_types("rmsnorm")


def test_only_a_unit_that_passes_no_gradient_when_off_can_be_dead():
    from steadygrad.measure import probe

    assert kinds.activation("relu").dies and kinds.activation("relu6").dies
    assert not any(kinds.activation(n).dies for n in ("leaky_relu", "prelu", "elu", "selu", "gelu"))
    torch.manual_seed(0)
    for activation, measured in ((nn.ReLU(), True), (nn.LeakyReLU(0.1), False)):
        model = nn.Sequential(nn.Linear(4, 4), activation, nn.Linear(4, 2))
        with torch.no_grad():
            model[0].bias.fill_(-10.0)  # off on every sample
        record = probe(model, torch.randn(8, 4)).records[1]
        assert (record.dead == 1.0) if measured else math.isnan(record.dead)
