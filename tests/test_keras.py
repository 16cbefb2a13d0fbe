"""Keras 3 models on the torch backend: probe, Monitor and doctor see their layers by Keras' names, read their
weights by Keras' variable names, measure the activation a layer applies inside itself, and ignore Keras' shape
inference. References are computed here, from Keras' own variables and numpy, not from steadygrad."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("steadygrad measures Keras models on the torch backend only", allow_module_level=True)

import steadygrad as sg  # noqa: E402
from steadygrad import kinds  # noqa: E402
from steadygrad.doctor import split_data  # noqa: E402
from steadygrad.measure.stats import SIGMOID_SATURATION  # noqa: E402


def seed_model(depth: int = 8, width: int = 32, **dense) -> keras.Model:
    """The seed material's model: a deep sigmoid stack, then a linear head (names given: Keras counts globally)."""
    keras.utils.set_random_seed(0)
    hidden = [keras.layers.Dense(width, activation="sigmoid", name=f"d{i}", **dense) for i in range(depth)]
    return keras.Sequential([keras.Input((width,)), *hidden, keras.layers.Dense(10, name="head")], name="seed")


def batch(n: int = 64, width: int = 32, classes: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, width, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_importing_steadygrad_does_not_import_keras():
    code = "import sys, steadygrad; print('keras' in sys.modules)"
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_parameter_roles_cover_torch_and_keras_names():
    for name in ("weight", "weight_ih_l0", "kernel", "recurrent_kernel", "depthwise_kernel", "embeddings", "gamma"):
        assert kinds.parameter_role(name) == "weight", name
    for name in ("bias", "bias_hh_l0", "beta"):
        assert kinds.parameter_role(name) == "bias", name
    for name in ("moving_mean", "moving_variance", "running_mean", "alpha"):
        assert kinds.parameter_role(name) is None, name


def test_seed_model_records_under_keras_names_with_keras_weights_and_vanishing_gradient():
    model = seed_model()
    x, y = batch()
    report = sg.probe(model, x, y)
    assert [r.name for r in report.records] == [f"d{i}" for i in range(8)] + ["head"]
    assert report.skipped == {}
    layers = model.layers
    for record, layer in zip(report.records, layers, strict=True):
        kernel = layer.kernel.numpy()
        assert record.weight_var == pytest.approx(np.var(kernel, ddof=1), rel=1e-6)  # unbiased, as torch's var
    # the gradient norms against a backward pass of our own (the probe left no .grad behind)
    assert all(layer.kernel.value.grad is None for layer in layers)
    F.cross_entropy(model(x), y).backward()
    for record, layer in zip(report.records, layers, strict=True):
        assert record.weight_grad_norm == pytest.approx(float(layer.kernel.value.grad.norm()), rel=1e-4)
        assert record.bias_grad_norm == pytest.approx(float(layer.bias.value.grad.norm()), rel=1e-4)
    # saturation is measured on the sigmoid Dense layers, not on the linear head
    assert all(math.isfinite(r.saturated) for r in report.records[:-1])
    assert math.isnan(report.records[-1].saturated)
    # the seed's observation: the first layer's gradient is orders of magnitude below the last's
    assert report.records[0].grad_norm < 1e-3 * report.records[-2].grad_norm
    assert "vanishing_gradients" in {f.kind for f in sg.diagnose(report)}


def test_saturation_of_a_dense_layers_own_sigmoid_against_numpy():
    model = seed_model(depth=2, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0))
    x, y = batch()
    report = sg.probe(model, x, y)
    first = model.layers[0]
    out = 1 / (1 + np.exp(-(x.numpy() @ first.kernel.numpy() + first.bias.numpy())))
    expected = np.mean((out < SIGMOID_SATURATION) | (out > 1 - SIGMOID_SATURATION))
    assert expected > 0.05  # the test can fail: this layer saturates
    assert report.records[0].saturated == pytest.approx(expected)


def test_relu_model_with_he_init_is_quiet_and_its_dead_units_are_measured():
    keras.utils.set_random_seed(0)
    hidden = [keras.layers.Dense(64, activation="relu", kernel_initializer="he_normal") for _ in range(6)]
    model = keras.Sequential([keras.Input((32,)), *hidden, keras.layers.Dense(10)])
    x, y = batch(256)
    report = sg.probe(model, x, y)
    assert all(math.isfinite(r.dead) for r in report.records[:-1])
    loud = [f for f in sg.diagnose(report) if f.severity in ("warning", "critical")]
    assert loud == []


def test_activation_layers_and_nested_models():
    keras.utils.set_random_seed(0)
    block = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(8, name="inner"), keras.layers.Activation("tanh", name="squash")],
        name="block",
    )
    model = keras.Sequential(
        [
            keras.Input((8,)),
            block,
            keras.layers.ReLU(name="rect"),
            keras.layers.Activation("linear", name="same"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    x, y = batch(32, 8, 3)
    report = sg.probe(model, x, y)
    assert [r.name for r in report.records] == ["block/inner", "block/squash", "rect", "out"]
    squash = report.records[1]
    assert math.isfinite(squash.saturated) and math.isnan(squash.dead)
    assert math.isfinite(report.records[2].dead)
    assert "Dropout" in report.skipped and "Sequential" not in report.skipped  # the block's layers are recorded
    # name patterns match the path-like names
    assert [r.name for r in sg.probe(model, x, y, layers="block/*").records] == ["block/inner", "block/squash"]
    assert [r.name for r in sg.probe(model, x, y, layers=keras.layers.Dense).records] == ["block/inner", "out"]


def test_recurrent_layer_is_recorded_whole_with_its_cells_kernel():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5, 4)), keras.layers.LSTM(6, name="lstm"), keras.layers.Dense(2)])
    x = torch.randn(8, 5, 4)
    report = sg.probe(model, x, torch.randint(0, 2, (8,)))
    lstm = report.records[0]
    assert lstm.name == "lstm" and lstm.call == 1
    kernel = model.layers[0].cell.kernel.numpy()
    assert lstm.weight_var == pytest.approx(np.var(kernel, ddof=1), rel=1e-6)


def test_unbuilt_model_is_refused_with_what_to_do():
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        sg.probe(model, torch.randn(3, 5))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="tanh", name="hidden")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.hidden(x))


def test_monitor_ignores_shape_inference_on_meta_tensors():
    keras.utils.set_random_seed(0)
    model = _Subclassed()
    x, y = batch(16, 8, 3)
    model(x)  # a subclassed model is built by its first call (on meta tensors, then on x)
    with sg.Monitor(model) as monitor:
        # Keras' shape inference runs the layers on meta tensors (fit does it too), then the real pass
        model.compute_output_spec(keras.KerasTensor((16, 8)))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        report = monitor.step()
    assert [(r.name, r.call) for r in report.records] == [("hidden", 1), ("head", 1)]
    assert all(math.isfinite(r.grad_norm) and math.isfinite(r.act_std) for r in report.records)
    assert math.isfinite(report.records[0].saturated)


def test_a_subclassed_model_not_yet_called_is_refused():
    model = _Subclassed()
    model.build((None, 8))  # marks the model built, not its layers
    with pytest.raises(ValueError, match="'hidden' is not built"):
        sg.Monitor(model)


def test_monitor_in_a_torch_training_loop_gives_the_update_ratio():
    model = seed_model(depth=2)
    x, y = batch()
    params = list(model.parameters())
    assert len(params) == 6 and all(isinstance(p, torch.nn.Parameter) for p in params)
    opt = torch.optim.SGD(params, lr=0.5)
    kernel = model.layers[0].kernel
    with sg.Monitor(model, optimizer=opt, update_every=1) as monitor:
        for _ in range(2):
            before = kernel.numpy().copy()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
    last = monitor.history.reports[-1]
    expected = np.linalg.norm(kernel.numpy() - before) / np.linalg.norm(before)
    assert last.records[0].name == "d0"
    assert last.records[0].update_ratio == pytest.approx(expected, rel=1e-4)


def test_monitor_stepped_by_hand_under_keras_fit():
    model = seed_model(depth=2)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = batch()
    monitor = sg.Monitor(model).attach()

    class StepMonitor(keras.callbacks.Callback):  # Keras' optimizer is not torch's: close each step by hand
        def on_train_batch_end(self, batch, logs=None):
            monitor.step()

    model.fit(x.numpy(), y.numpy(), batch_size=32, epochs=1, verbose=0, callbacks=[StepMonitor()])
    monitor.detach()
    reports = monitor.history.reports
    assert len(reports) == 2
    assert all(math.isfinite(r.weight_grad_norm) and r.call == 1 for rep in reports for r in rep.records)


def exploding_model() -> keras.Model:
    """Deep ReLU layers at 2.4x He's scale: the gradient grows about 2.4x per layer towards the input."""
    init = keras.initializers.RandomNormal(stddev=0.6)
    hidden = [keras.layers.Dense(32, activation="relu", kernel_initializer=init) for _ in range(8)]
    return keras.Sequential([keras.Input((16,)), *hidden, keras.layers.Dense(4)])


def doctor_inputs() -> torch.Tensor:
    return torch.randn(64, 16, generator=torch.Generator().manual_seed(2))


def test_doctor_runs_on_a_keras_model_and_says_which_fixes_to_make_in_keras():
    keras.utils.set_random_seed(0)
    model = exploding_model()
    kernels = [layer.kernel.numpy().copy() for layer in model.layers]
    report = sg.doctor(model, doctor_inputs(), classes=4, steps=3, budget=30)
    assert "exploding_gradients" in {f.kind for f in report.findings}
    assert not report.control.error and report.control.steps == 3
    assert report.control.losses[0] != report.control.losses[-1]  # the copy trained under the torch optimizer
    # the training settings change the training, not the model: they run; module surgery is skipped the Keras way
    actions = {t.action for t in report.candidates}
    assert actions == {"clip", "agc", "warmup", "lower_lr", "raise_lr", "change_optimizer"}
    clip = next(t for t in report.candidates if t.action == "clip")
    assert clip.ok and clip.fix.startswith("clip gradient norm")
    assert any("not tried" in why and "kernel_initializer='he_normal'" in why for why in report.skipped)
    assert any("keras.layers.BatchNormalization()" in why for why in report.skipped)
    for layer, kernel in zip(model.layers, kernels, strict=True):
        np.testing.assert_array_equal(layer.kernel.numpy(), kernel)  # the user's model is untouched


def test_tensorboard_histograms_of_a_keras_kernel(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = seed_model(depth=1)
    x, y = batch()
    with sg.Monitor(model, sinks=[sg.measure.TensorBoardSink(tmp_path)]) as monitor:
        F.cross_entropy(model(x), y).backward()
        monitor.step()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    histogram = events.Histograms("d0/weight_grad")[0].histogram_value
    assert histogram.num == 32 * 32
    assert histogram.sum == pytest.approx(float(model.layers[0].kernel.value.grad.sum()), abs=1e-5)


def test_a_pattern_that_matches_nothing_lists_the_keras_names():
    model = seed_model(depth=2)
    with pytest.raises(ValueError, match=r"Its modules: d0, d1, head\."):
        sg.Monitor(model, layers="conv*")


def _one_monitored_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with sg.Monitor(model, optimizer=opt) as monitor:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return monitor.history.reports[-1].records


def test_compiled_taps_agree_with_the_eager_statistics_on_a_keras_model():
    pytest.importorskip("numba")
    x, y = batch()
    eager = _one_monitored_step(seed_model(depth=2), x, y)
    try:
        assert sg.fast.enable("numba")
        compiled = _one_monitored_step(seed_model(depth=2), x, y)
    finally:
        sg.fast.disable()
    fields = ("act_std", "saturated", "grad_norm", "weight_grad_norm", "bias_grad_norm", "weight_var", "update_ratio")
    for a, b in zip(compiled, eager, strict=True):
        for name in fields:
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-5, nan_ok=True), (a.name, name)
    assert math.isfinite(eager[0].update_ratio) and math.isfinite(eager[0].saturated)


def test_a_keras_model_factory_gives_the_doctor_the_same_weights_for_every_trial():
    import random

    state = random.getstate()
    runs = [sg.doctor(exploding_model, doctor_inputs(), classes=4, steps=2, budget=30) for _ in range(2)]
    assert random.getstate() == state  # the global random state is left as found
    # every trial's first seed starts from the same weights (losses: the first seed's curve)
    first_losses = {trial.losses[0] for report in runs for trial in [report.control, *report.candidates]}
    assert len(runs[0].candidates) == 6 and len(first_losses) == 1
    seeds = {r.seed: r.losses[0] for r in runs[0].control.repeats}
    assert len(set(seeds.values())) == len(seeds) == 3  # and each seed from its own


def test_a_keras_model_on_another_backend_is_refused_with_the_backend_to_set(monkeypatch):
    import types

    from steadygrad import _keras

    class OtherBackendLayer:  # what a keras.layers.Layer is under JAX or TensorFlow: not an nn.Module
        pass

    stand_in = types.SimpleNamespace(layers=types.SimpleNamespace(Layer=OtherBackendLayer))
    monkeypatch.setattr(_keras, "_keras", lambda: stand_in)
    with pytest.raises(TypeError, match="set KERAS_BACKEND=torch"):
        sg.probe(OtherBackendLayer(), torch.randn(2, 3))
    with pytest.raises(TypeError, match="set KERAS_BACKEND=torch"):
        sg.Monitor(OtherBackendLayer())
    assert _keras.backend_hint(object()) == ""


def test_probe_modes_reach_keras_layers_and_leave_their_state_as_found():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="dense"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.Dropout(0.5, name="drop"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    x, y = batch(64, 8, 3)
    bn = model.get_layer("bn")
    moving = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    hidden = x.numpy() @ model.get_layer("dense").kernel.numpy()  # the BN layer's input (the bias starts at 0)
    train = sg.probe(model, x, y)  # mode="train": Keras' training=True, batch statistics, dropout off
    evaluation = sg.probe(model, x, y, mode="eval")  # training=False: the moving statistics (0 and 1 at first)
    bn_train = next(r for r in train.records if r.name == "bn")
    bn_eval = next(r for r in evaluation.records if r.name == "bn")
    assert bn_train.act_std == pytest.approx(1.0, rel=0.02)  # normalized by the batch's own statistics
    assert bn_eval.act_std == pytest.approx(hidden.std(ddof=1) / math.sqrt(1 + 1e-3), rel=0.02)
    assert abs(bn_eval.act_std - 1.0) > 0.1  # the two modes differ: the test can fail
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving[0])  # training=True's update undone
    np.testing.assert_array_equal(bn.moving_variance.numpy(), moving[1])
    assert model.get_layer("drop").rate == 0.5
    again = sg.probe(model, x, y)
    assert [r.grad_norm for r in again.records] == [r.grad_norm for r in train.records]  # dropout off: deterministic


def test_doctor_trains_a_keras_model_in_training_mode():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(16), keras.layers.BatchNormalization(), keras.layers.Dense(4)]
    )
    x = doctor_inputs() * 3 + 1
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(3))
    report = sg.doctor(model, x, y, steps=1, batch_size=64, budget=30)
    first = split_data((x, y), 64, seed=0).train[0]  # the batch the first step trained on
    with torch.no_grad():
        inference = float(F.cross_entropy(model(first.inputs, training=False), first.targets))
        training = float(F.cross_entropy(model(first.inputs, training=True), first.targets))  # batch statistics
    assert abs(training - inference) > 1e-2  # the test can fail
    assert report.control.losses[0] == pytest.approx(training, rel=1e-5)


class Jitter(keras.layers.Layer):
    """Random in training through its own SeedGenerator, and neither a dropout nor a noise layer by its name."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1)

    def call(self, x, training=False):
        return x + 0.1 * keras.random.normal(keras.ops.shape(x), seed=self.seed_generator) if training else x


def test_a_train_mode_probe_switches_noise_off_is_repeatable_and_leaves_every_variable_as_found():
    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8,)),
            layers.Dense(16, name="dense"),
            layers.BatchNormalization(name="bn"),
            layers.GaussianNoise(0.5, name="noise"),
            layers.Dropout(0.3, name="drop"),
            layers.GaussianDropout(0.3, name="gdrop"),
            Jitter(name="jitter"),
            layers.Dense(3, name="out"),
        ]
    )
    x, y = batch(64, 8, 3)
    variables = model.variables
    assert any("seed_generator" in v.path for v in variables) and not any(
        "seed_generator" in v.path for v in model.non_trainable_weights
    )
    before = [v.value.detach().clone() for v in variables]
    first, second = sg.probe(model, x, y), sg.probe(model, x, y)
    assert first.loss == second.loss  # Jitter draws the same: its seed state was put back
    assert [r.grad_norm for r in first.records] == [r.grad_norm for r in second.records]
    for variable, saved in zip(model.variables, before, strict=True):
        assert torch.equal(variable.value, saved), variable.path
    switches = model.get_layer("noise").stddev, model.get_layer("drop").rate, model.get_layer("gdrop").rate
    assert switches == (0.5, 0.3, 0.3)
    assert "3 dropout" in " ".join(first.notes)
    # the probe measured the network with the noise and dropout layers off (Jitter drawing from the same state)
    model.get_layer("noise").stddev, model.get_layer("drop").rate, model.get_layer("gdrop").rate = 0.0, 0.0, 0.0
    with torch.no_grad():
        quiet = float(F.cross_entropy(model(x, training=True), y))
    assert first.loss == pytest.approx(quiet, rel=1e-6)


def test_preprocessing_normalization_is_no_norm_and_a_container_is_listed_only_when_nothing_inside_is():
    keras.utils.set_random_seed(0)
    layers = keras.layers
    frozen = layers.BatchNormalization(name="frozen")
    quiet = keras.Sequential([keras.Input((8,)), layers.Dropout(0.1, name="inner_drop")], name="quiet")
    model = keras.Sequential(
        [
            keras.Input((8,)),
            layers.Normalization(axis=-1, mean=0.5, variance=4.0, name="standardize"),  # no variable at all
            layers.Normalization(axis=-1, name="adapted"),  # mean, variance and count: statistics, not learned
            layers.Dense(8, name="dense"),
            layers.BatchNormalization(name="bn"),
            frozen,
            layers.BatchNormalization(center=False, scale=False, name="bare_bn"),
            layers.LayerNormalization(center=False, scale=False, name="bare_ln"),
            layers.UnitNormalization(name="unit"),
            quiet,
            layers.Dense(3, name="out"),
        ]
    )
    model.get_layer("adapted").adapt(np.random.default_rng(0).normal(size=(64, 8)).astype("float32"))
    frozen.trainable = False  # its gamma and beta are no longer trainable: it is still a norm
    x, y = batch(32, 8, 3)
    report = sg.probe(model, x, y)
    assert [r.name for r in report.records] == ["dense", "bn", "frozen", "bare_bn", "bare_ln", "unit", "out"]
    assert report.skipped == {
        "Normalization": "a preprocessing layer: its statistics are taken from the data (adapt), nothing in it is "
        "learned",
        "Sequential": "a container of layers none of which is recorded",
        "Dropout": "no weight, and neither a normalization nor an activation steadygrad knows",
    }


def test_the_rules_that_read_weights_read_keras_kernels():
    keras.utils.set_random_seed(0)
    huge = keras.initializers.RandomNormal(stddev=2.0)
    model = keras.Sequential(
        [keras.Input((64,))]
        + [keras.layers.Dense(64, activation="relu", kernel_initializer=huge, name=f"h{i}") for i in range(3)]
        + [keras.layers.Dense(10, name="out")]  # names given: Keras counts layers across the whole process
    )
    x = torch.randn(32, 64)
    found = sg.diagnose(sg.probe(model, x), model=model, inputs=x)
    (exploding,) = [f for f in found if f.kind == "exploding_gradients"]
    # the hidden layers' gain sqrt(fan_in * E[W^2]) with fan_in = 64 (Keras' kernel is (in, out)): about 2 * 8
    gains = exploding.evidence["layer_gain"]
    assert set(gains) == {"h0", "h1", "h2"}
    for name, gain in gains.items():
        kernel = model.get_layer(name).kernel.numpy()
        assert gain == pytest.approx(math.sqrt(64 * float(np.mean(kernel.astype(np.float64) ** 2))), rel=1e-6)
