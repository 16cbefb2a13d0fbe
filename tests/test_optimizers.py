"""steadygrad.optimizers: each name builds torch's optimizer with the documented settings."""

import pytest
import torch

from steadygrad.optimizers import OPTIMIZERS, make_optimizer


@pytest.mark.parametrize(
    ("name", "cls", "momentum"),
    [
        ("sgd", torch.optim.SGD, 0.0),
        ("momentum", torch.optim.SGD, 0.9),
        ("adam", torch.optim.Adam, None),
        ("adamw", torch.optim.AdamW, None),
    ],
)
def test_names_build_torch_optimizers(name, cls, momentum):
    opt = make_optimizer(name, [torch.nn.Parameter(torch.zeros(3))], lr=0.05, weight_decay=0.0)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.05 and group["weight_decay"] == 0.0
    if momentum is not None:
        assert group["momentum"] == momentum
    assert name in OPTIMIZERS


def test_unknown_name_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="Accepted: sgd, momentum, adam, adamw"):
        make_optimizer("lbfgs", [torch.nn.Parameter(torch.zeros(1))], lr=1.0)
