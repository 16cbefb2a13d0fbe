"""The μP coordinate check: SP grows with width under Adam, μP stays flat, the sizes are what they say they are."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from steadygrad.coord import FLAT_SLOPE, CoordCheck, coord_check, fit_slope

torch.set_num_threads(1)

D_IN, CLASSES, BATCH = 16, 10, 32
WIDTHS = [32, 64, 128, 256]
STEPS = 3


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, D_IN, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def sp_mlp(width: int, hidden: int = 1) -> nn.Sequential:
    """The standard parametrization: torch's default init, one learning rate."""
    layers = [nn.Linear(D_IN, width), nn.ReLU()]
    for _ in range(hidden):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, CLASSES))


class Readout(nn.Linear):
    """The output layer with its multiplier inside it (mup's ``MuReadout``), so that the check measures it."""

    def __init__(self, in_features: int, out_features: int, multiplier: float = 1.0) -> None:
        super().__init__(in_features, out_features)
        self.multiplier = multiplier

    def forward(self, x):
        return super().forward(x) * self.multiplier


class MuMLP(nn.Module):
    """μP for Adam, Tensor Programs V, Table 3: input and hidden weights init var 1/fan_in, the output weights
    zero (the limit of var 1/fan_in^2), biases zero; Adam's lr unscaled for the input weights and every bias,
    lr * base_width / width for the hidden and output weights, output multiplier 1. (With a base_width/width
    multiplier on top of the scaled output lr the output's update shrinks like 1/width: ``test_shrinking``.)"""

    def __init__(self, width: int, base_width: int = 32, output_multiplier: float = 1.0) -> None:
        super().__init__()
        self.width, self.base_width = width, base_width
        self.inp, self.hid = nn.Linear(D_IN, width), nn.Linear(width, width)
        self.out = Readout(width, CLASSES, output_multiplier)
        with torch.no_grad():
            self.inp.weight.normal_(0.0, D_IN**-0.5)
            self.hid.weight.normal_(0.0, width**-0.5)
            self.out.weight.zero_()
            for layer in (self.inp, self.hid, self.out):
                layer.bias.zero_()

    def forward(self, x):
        return self.out(F.relu(self.hid(F.relu(self.inp(x)))))

    def steadygrad_param_groups(self, lr: float) -> list[dict]:
        scaled = lr * self.base_width / self.width
        return [
            {"params": [self.inp.weight, self.inp.bias, self.hid.bias, self.out.bias], "lr": lr},
            {"params": [self.hid.weight, self.out.weight], "lr": scaled},
        ]


class MuMLPOneGroup(MuMLP):
    """μP's init without μP's learning rates: the method is gone, so the check takes model.parameters()."""

    steadygrad_param_groups = None


@pytest.fixture(scope="module")
def sp_check(batch) -> CoordCheck:
    return coord_check(sp_mlp, WIDTHS, STEPS, batch, optimizer="adam", lr=1e-2)


@pytest.fixture(scope="module")
def mu_check(batch) -> CoordCheck:
    return coord_check(MuMLP, WIDTHS, STEPS, batch, optimizer="adam", lr=1e-2)


# -- 1. the standard parametrization blows up ------------------------------------------------------------------


def test_standard_parametrization_grows_with_width(sp_check):
    slopes = sp_check.slopes
    assert list(slopes) == [
        "* (Linear, input)",
        "* (ReLU, input)",
        "* (Linear, hidden)",
        "* (ReLU, hidden)",
        "* (Linear, output)",
    ]
    # Adam moves each of the n entries of a hidden/output weight by about lr: the output moves by ~lr * n.
    # Measured: hidden 0.42, its ReLU 0.47, output 1.04 (the hidden layer's Θ(1) init part still dominates at
    # width 32, so its slope over 32-256 is below the asymptotic 1).
    assert slopes["* (Linear, hidden)"] > FLAT_SLOPE
    assert slopes["* (ReLU, hidden)"] > FLAT_SLOPE
    assert slopes["* (Linear, output)"] > 0.75
    # the input layer has a fixed fan-in: its Adam update does not grow with width
    assert abs(slopes["* (Linear, input)"]) < FLAT_SLOPE
    assert not sp_check.flat
    assert set(sp_check.growing) == {"* (Linear, hidden)", "* (ReLU, hidden)", "* (Linear, output)"}
    assert "* (Linear, hidden)" in sp_check.verdict and "* (Linear, output)" in sp_check.verdict
    assert "* (Linear, input)" not in sp_check.verdict
    assert "one group (model.parameters())" in sp_check.optimizer


def test_growth_comes_from_the_updates(sp_check):
    """At initialization SP is flat (Kaiming-style init is right for the forward pass); the updates grow."""
    assert all(abs(a) < FLAT_SLOPE for a in sp_check.slopes_at(0).values())
    # the slope is the least-squares fit of log size on log width, as numpy's polyfit computes it
    for group, sizes in sp_check.sizes.items():
        expected = np.polyfit(np.log(sp_check.widths), np.log(sizes[:, STEPS]), 1)[0]
        assert sp_check.slopes[group] == pytest.approx(expected, rel=1e-9)


# -- 2. μP stays flat, through its own param groups --------------------------------------------------------------


def test_mup_is_flat(mu_check):
    assert list(mu_check.slopes) == ["inp (Linear, input)", "hid (Linear, hidden)", "out (Readout, output)"]
    assert all(abs(a) < FLAT_SLOPE for a in mu_check.slopes.values()), mu_check.slopes  # measured |a| <= 0.07
    assert mu_check.flat
    assert mu_check.verdict.startswith("Flat")
    assert "2 param groups from steadygrad_param_groups(lr)" in mu_check.optimizer


@pytest.mark.parametrize("parametrization", ["standard", "mup"])
def test_built_transformers_grow_under_sp_and_stay_flat_under_mup(parametrization):
    """NetSpec(kind="transformer", parametrization="mup"): zero head, 1/head_dim logits, lr * base / width on the
    matrices. Its blocks and head stay flat over widths 32-256 where the standard ones grow like width^0.3-0.5."""
    from steadygrad.nets import NetSpec, build

    base = NetSpec(kind="transformer", depth=2, width=32, heads=4, seq_len=16, vocab=64, base_width=32)
    check = coord_check(
        lambda w: build(base.replace(width=w, parametrization=parametrization)),
        WIDTHS,
        steps=STEPS,
        data=base.example_batch(16, torch.Generator().manual_seed(0)),
        lr=1e-2,
    )
    hidden, head = check.slopes["block* (TransformerBlock, hidden)"], check.slopes["head (Linear, output)"]
    if parametrization == "standard":
        assert not check.flat and hidden > FLAT_SLOPE and head > FLAT_SLOPE
    else:
        assert check.flat and abs(hidden) < 0.1


def test_without_the_param_groups_mup_init_alone_grows(batch):
    check = coord_check(MuMLPOneGroup, WIDTHS, STEPS, batch, lr=1e-2)
    assert "one group (model.parameters())" in check.optimizer
    assert not check.flat
    # measured 0.86; the hidden layer barely moves (0.09): the zero readout sends it no gradient at step 1
    assert check.growing == ["out (Readout, output)"]


def test_a_callable_optimizer_is_used(batch):
    calls = []

    def sgd(model, lr):
        calls.append(lr)
        return torch.optim.SGD(model.parameters(), lr=lr)

    check = coord_check(sp_mlp, [32, 64], 1, batch, optimizer=sgd, lr=0.5)
    assert calls == [0.5, 0.5]
    assert "sgd(model, lr=0.5)" in check.optimizer


def test_shrinking(batch):
    """A 1/width output multiplier on top of μP's 1/width output learning rate: the output's update vanishes."""
    check = coord_check(lambda w: MuMLP(w, output_multiplier=32 / w), WIDTHS, STEPS, batch, lr=1e-2)
    assert check.slopes["out (Readout, output)"] < -FLAT_SLOPE
    assert check.shrinking == ["out (Readout, output)"]
    assert not check.flat
    assert "shrinks with width: out (Readout, output)" in check.verdict


# -- 3. the sizes are mean |y| of the outputs, before and after an update -------------------------------------------


def test_sizes_match_an_independent_computation(batch):
    x, y = batch
    check = coord_check(lambda w: sp_mlp(w, hidden=2), [32, 64], 2, batch, lr=1e-2, seed=7)
    torch.manual_seed(7)
    model = sp_mlp(64, hidden=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    expected = []
    for _ in range(2):
        with torch.no_grad():
            h0 = model[0](x)
            h1 = model[2](F.relu(h0))
            h2 = model[4](F.relu(h1))
        expected.append((h0.abs().mean().item(), (h1.abs().mean().item() + h2.abs().mean().item()) / 2))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    # step 0: the initialization; step 1: after one update. The hidden group averages its two layers.
    for t, (inp, hidden) in enumerate(expected):
        assert check.sizes["* (Linear, input)"][1, t] == pytest.approx(inp, rel=1e-5)
        assert check.sizes["* (Linear, hidden)"][1, t] == pytest.approx(hidden, rel=1e-5)
    assert check.layers["* (Linear, hidden)"] == ["2", "4"]
    assert check.sizes["* (Linear, hidden)"].shape == (2, 3)


class PairOut(nn.Module):
    """A layer whose output is a tuple: its first tensor is what is measured."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(D_IN, width)

    def forward(self, x):
        return self.lin(x), torch.full((3,), 1e6)


class TupleNet(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.pair, self.head = PairOut(width), nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.head(self.pair(x)[0])


def test_tuple_output_takes_its_first_tensor(batch):
    x, _ = batch
    check = coord_check(TupleNet, [32, 64], 1, batch, layers=["pair"])
    torch.manual_seed(0)
    model = TupleNet(32)
    with torch.no_grad():
        assert check.sizes["pair (PairOut, input)"][0, 0] == pytest.approx(model.pair.lin(x).abs().mean().item())


def test_layers_selects(batch):
    check = coord_check(sp_mlp, [32, 64], 1, batch, layers=nn.Linear)
    assert all("ReLU" not in group for group in check.sizes)
    with pytest.raises(ValueError, match="selects no layer"):
        coord_check(sp_mlp, [32, 64], 1, batch, layers="nothing*")


def test_fit_slope_is_least_squares_on_finite_points():
    widths = [32, 64, 128, 256]
    assert fit_slope(widths, [3.0 * w**0.5 for w in widths]) == pytest.approx(0.5)
    assert fit_slope(widths, [1.0, 2.0, math.nan, 8.0]) == pytest.approx(1.0)
    assert math.isnan(fit_slope(widths, [1.0, 0.0, math.inf, math.nan]))  # one point left: no slope
    reference = np.polyfit(np.log(widths), np.log([1.0, 1.7, 3.1, 9.0]), 1)[0]
    assert fit_slope(widths, [1.0, 1.7, 3.1, 9.0]) == pytest.approx(reference)


# -- the data, the loss, the random state ----------------------------------------------------------------------


def test_data_forms_agree(batch):
    reference = coord_check(sp_mlp, [32, 64], 2, batch)
    by_step = coord_check(sp_mlp, [32, 64], 2, lambda step: batch)
    by_iterable = coord_check(sp_mlp, [32, 64], 2, iter([batch]))  # one batch, taken again
    by_list = coord_check(sp_mlp, [32, 64], 2, [list(batch)] * 5)  # DataLoader-style [inputs, targets]
    for other in (by_step, by_iterable, by_list):
        for group, sizes in reference.sizes.items():
            np.testing.assert_allclose(other.sizes[group], sizes, rtol=1e-6)
    assert reference.loss.startswith("cross-entropy (N, C)")


def test_each_step_takes_its_own_batch(batch):
    x, y = batch
    check = coord_check(sp_mlp, [32, 64], 1, lambda step: (x * (1 + 9 * step), y), layers="0")
    torch.manual_seed(0)
    first = sp_mlp(32)[0]
    assert check.sizes["* (Linear, input)"][0, 0] == pytest.approx(first(x).abs().mean().item(), rel=1e-5)
    assert check.sizes["* (Linear, input)"][0, 1] > 5 * check.sizes["* (Linear, input)"][0, 0]


def test_synthetic_data_and_sequence_outputs():
    check = coord_check(sp_mlp, [32, 64], 1)
    assert check.loss.startswith("random projection")

    class TinyLM(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.embed, self.mix, self.head = nn.Embedding(20, width), nn.Linear(width, width), nn.Linear(width, 20)

        def forward(self, tokens):  # (N, T) -> (N, T, V)
            return self.head(torch.tanh(self.mix(self.embed(tokens))))

    tokens = torch.randint(0, 20, (8, 5), generator=torch.Generator().manual_seed(0))
    check = coord_check(TinyLM, [32, 64], 1, (tokens, tokens))
    assert check.loss.startswith("cross-entropy (N, T, C)")
    assert check.roles == {"embed (Embedding, input)": "input", "mix (Linear, hidden)": "hidden",
                           "head (Linear, output)": "output"}  # fmt: skip


def test_reproducible_and_leaves_the_random_state(batch):
    state = torch.get_rng_state()
    a = coord_check(sp_mlp, [32, 64], 1, batch, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = coord_check(sp_mlp, [32, 64], 1, batch, seed=3)
    c = coord_check(sp_mlp, [32, 64], 1, batch, seed=4)
    group = "* (Linear, hidden)"
    np.testing.assert_array_equal(a.sizes[group], b.sizes[group])
    assert not np.array_equal(a.sizes[group], c.sizes[group])


def test_hooks_are_removed_also_on_error(batch):
    built = []

    class Breaks(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.lin, self.calls = nn.Linear(D_IN, CLASSES), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return self.lin(x)

    def make(width):
        built.append(Breaks(width))
        return built[-1]

    with pytest.raises(RuntimeError, match="boom"):
        coord_check(make, [32, 64], 2, batch)
    assert not built[0].lin._forward_hooks
    ok = coord_check(sp_mlp, [32, 64], 1, batch)
    fresh = coord_check(sp_mlp, [32, 64], 1, batch)  # a later check is not disturbed by the failed one's hooks
    assert ok.sizes.keys() == fresh.sizes.keys()
    for group in ok.sizes:
        np.testing.assert_array_equal(ok.sizes[group], fresh.sizes[group])


def test_a_loss_without_a_gradient_and_bad_fit_inputs_are_named():
    frozen = lambda width: sp_mlp(width).requires_grad_(False)  # noqa: E731
    data = (torch.randn(8, 16), torch.randint(0, 10, (8,)))
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        coord_check(frozen, [32, 64], 1, data)
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        coord_check(sp_mlp, [32, 64], 1, data, loss=lambda output, targets: torch.zeros(()))
    with pytest.raises(ValueError, match="as many sizes as widths"):
        fit_slope([32, 64, 128], [1.0, 2.0])
    with pytest.raises(TypeError):
        coord_check(sp_mlp, [32, 64], 1, (torch.randn(8, 16), torch.randint(0, 10, (8,)))).slopes_at(1.5)


# -- 4. validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"widths": [64]}, ValueError, r"widths must be .* at least 2 .*got 1"),
        ({"widths": []}, ValueError, r"widths must be .*got 0"),
        ({"widths": [32, 0]}, ValueError, r"widths must be .*non-positive \[0\]"),
        ({"widths": [-32, 64]}, ValueError, r"widths must be .*non-positive \[-32\]"),
        ({"widths": [32, 64, 32]}, ValueError, r"widths must be .*\[32\] more than once"),
        ({"widths": [32, 64.0]}, TypeError, r"widths must be .*64.0"),
        ({"widths": 64}, TypeError, r"widths must be a sequence"),
        ({"steps": 0}, ValueError, r"steps must be an integer >= 1"),
        ({"lr": 0.0}, ValueError, r"lr must be"),
        ({"optimizer": "lion"}, ValueError, r"Unknown optimizer 'lion'. Accepted: sgd"),
        ({"optimizer": 3}, TypeError, r"optimizer must be one of"),
        ({"loss": "mse"}, TypeError, r"loss must be None or a callable"),
        ({"data": "batch.pt"}, TypeError, r"data= takes a batch"),
        ({"data": 42}, TypeError, r"data= takes a batch .*got int"),
        ({"data": (torch.zeros(2, D_IN),)}, TypeError, r"data is a tuple of 1 items, not 2"),
        ({"data": [torch.zeros(2, D_IN), torch.zeros(2)]}, TypeError, r"list of tensors is ambiguous"),
        ({"data": lambda step: "x"}, TypeError, r"data\(0\) is a str"),
        ({"data": iter([])}, ValueError, r"yielded no batch"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_validation(batch, kwargs, error, match):
    arguments = {"widths": [32, 64], "steps": 1, "data": batch, **kwargs}
    with pytest.raises(error, match=match):
        coord_check(sp_mlp, **arguments)


def test_make_model_must_return_a_module_with_the_same_layers(batch):
    with pytest.raises(TypeError, match=r"make_model\(32\) must return an nn.Module"):
        coord_check(lambda w: "net", [32, 64], 1, batch)
    with pytest.raises(ValueError, match="same layers at every width"):
        coord_check(lambda w: sp_mlp(w, hidden=w // 32), [32, 64], 1, batch)


# -- 5. the result as table, figure, JSON and text ---------------------------------------------------------------


def test_table_figure_dict_and_text(sp_check):
    table = sp_check.table()
    assert table.columns == ["layer", "width", "step 0", "step 1", "step 2", "step 3", "slope"]
    assert len(table.rows) == len(sp_check.sizes) * len(WIDTHS)
    assert [row[:2] for row in table.rows[:4]] == [["* (Linear, input)", w] for w in WIDTHS]
    figure = sp_check.figure()
    assert figure.png.startswith(b"\x89PNG")
    assert "Coordinate check" in figure.caption and "Not drawn" not in figure.caption
    data = json.loads(json.dumps(sp_check.to_dict(), allow_nan=False))
    assert data["widths"] == WIDTHS and data["flat"] is False and data["verdict"] == sp_check.verdict
    assert data["sizes"]["* (Linear, output)"][3][3] == pytest.approx(sp_check.sizes["* (Linear, output)"][3, 3])
    assert len(data["slopes_by_step"]) == STEPS + 1
    text = str(sp_check)
    assert sp_check.verdict in text
    assert "* (Linear, hidden)" in text and "slope" in text


def test_figure_draws_at_most_eight_groups_and_names_the_rest(batch):
    class Wide(nn.Module):  # ten differently named hidden layers: ten groups
        def __init__(self, width: int) -> None:
            super().__init__()
            self.first = nn.Linear(D_IN, width)
            self.mids = nn.ModuleDict({f"m{chr(97 + i)}": nn.Linear(width, width) for i in range(10)})
            self.last = nn.Linear(width, CLASSES)

        def forward(self, x):
            x = self.first(x)
            for layer in self.mids.values():
                x = torch.tanh(layer(x))
            return self.last(x)

    check = coord_check(Wide, [32, 64], 1, batch)
    assert len(check.sizes) == 12
    caption = check.figure().caption
    assert "Not drawn (4 of 12 groups)" in caption


# -- 6. a diverging run ------------------------------------------------------------------------------------------


def exploding(width: int) -> nn.Sequential:
    """Weights scaled by 1e20: the hidden pre-activations overflow float32 at the first forward."""
    model = sp_mlp(width)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e20)
    return model


def test_diverging_run_is_reported_not_raised(batch):
    check = coord_check(exploding, WIDTHS, 2, batch)
    assert np.isnan(check.sizes["* (Linear, hidden)"]).all()
    assert np.isnan(check.sizes["* (Linear, input)"][:, 1:]).all()  # the NaN gradients reached every weight
    assert np.isfinite(check.sizes["* (Linear, input)"][:, 0]).all()  # 1e20-ish but finite at step 0
    assert not check.flat
    assert "non-finite sizes (the run diverged)" in check.verdict
    assert "too few finite, positive sizes" in check.verdict
    assert all(math.isnan(a) for a in check.slopes.values())
    data = json.loads(json.dumps(check.to_dict(), allow_nan=False))
    assert data["sizes"]["* (Linear, hidden)"][0][0] is None and data["slopes"]["* (Linear, hidden)"] is None
    assert check.figure().png.startswith(b"\x89PNG")
    assert "nan" in str(check)


def test_partly_diverging_run_fits_the_finite_widths(batch):
    check = coord_check(lambda w: exploding(w) if w >= 128 else sp_mlp(w), WIDTHS, 2, batch)
    assert math.isfinite(check.slopes["* (Linear, input)"])  # from widths 32 and 64
    assert "at width 128 from step 0, 256 from step 0" in check.verdict
    assert any("leave out" in note and "width 128" in note for note in check.notes)
