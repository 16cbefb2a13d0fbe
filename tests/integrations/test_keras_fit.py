"""SteadygradCallback in real Keras 3 fits on the torch backend."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("Keras runs another backend here: steadygrad needs KERAS_BACKEND=torch", allow_module_level=True)
from steadygrad.integrations.keras import SteadygradCallback  # noqa: E402


def _data(n=128):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 8)).astype("float32")
    return x, x[:, :4].argmax(1)


def _model(depth=2, width=16, activation="tanh"):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((8,))] + [keras.layers.Dense(width, activation=activation) for _ in range(depth)]
    model = keras.Sequential([*layers, keras.layers.Dense(4)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def test_records_every_n_batches_with_the_batch_loss_and_update_ratio(tmp_path):
    model = _model()
    x, y = _data()
    first = model(x[:32])
    expected = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y[:32], first))
    callback = SteadygradCallback(every=3, log_dir=tmp_path)
    model.fit(
        x, y, batch_size=32, epochs=2, verbose=0, shuffle=False, validation_data=(x[:32], y[:32]), callbacks=[callback]
    )
    assert [r.step for r in callback.reports] == [1, 4, 7]  # 4 batches an epoch, 8 in all
    assert callback.reports[0].loss == pytest.approx(expected, rel=1e-5)
    assert all(math.isfinite(r.loss) for r in callback.reports)
    dense = [rec for rec in callback.reports[0].records if math.isfinite(rec.weight_grad_norm)]
    assert dense and all(math.isfinite(rec.update_ratio) and rec.update_ratio > 0 for rec in dense)
    saved = json.loads((tmp_path / "steadygrad_findings.json").read_text())
    assert saved["logged_steps"] == [1, 4, 7]
    assert "compute_loss" not in model.__dict__  # the loss hook is gone
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_every_epoch(tmp_path):
    callback = SteadygradCallback(every="epoch", print_findings=False)
    x, y = _data()
    _model().fit(x, y, batch_size=32, epochs=3, verbose=0, callbacks=[callback])
    assert [r.step for r in callback.reports] == [1, 5, 9]


def test_a_deep_sigmoid_model_is_found_vanishing_and_a_healthy_one_is_not():
    x, y = _data()
    broken = SteadygradCallback(every=2, print_findings=False)
    _model(depth=12, width=32, activation="sigmoid").fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[broken])
    assert "vanishing_gradients" in {f.kind for f in broken.findings}
    healthy = SteadygradCallback(every=2, print_findings=False)
    _model().fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[healthy])
    assert healthy.findings == []


def test_bad_every():
    with pytest.raises(ValueError, match='"epoch"'):
        SteadygradCallback(every=0)
    assert torch.is_grad_enabled()


def test_the_nonfinite_policy_stops_the_fit_names_the_layer_and_keeps_the_weights():
    x, y = _data()
    x[70, 0] = np.nan  # in the third batch
    model = _model()
    callback = SteadygradCallback(every=5, nonfinite="stop", print_findings=False)
    model.fit(x, y, batch_size=32, epochs=3, verbose=0, shuffle=False, callbacks=[callback])
    assert callback.monitor.step_count == 3  # stopped at the third batch, not after 3 epochs
    assert "step 3" in callback.stopped and "the batch's inputs" in callback.stopped
    assert all(np.isfinite(w.numpy()).all() for w in model.weights)
