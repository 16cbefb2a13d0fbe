"""steadygrad's callback in Keras 3's model.fit: KERAS_BACKEND=torch python examples/keras_fit.py
(pip install "steadygrad[keras]")."""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np

from steadygrad.integrations.keras import SteadygradCallback

if __name__ == "__main__":
    x = np.random.default_rng(0).standard_normal((512, 16)).astype("float32")
    y = x[:, :4].argmax(1)
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = SteadygradCallback(every="epoch", log_dir="runs/keras")
    model.fit(x, y, epochs=3, batch_size=32, validation_split=0.2, verbose=0, callbacks=[callback])
    print(f"logged steps {[r.step for r in callback.reports]}; findings: {[f.kind for f in callback.findings]}")
