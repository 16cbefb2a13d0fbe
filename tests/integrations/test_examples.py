"""The README's framework sections point at examples/: each runs as written, from a fresh directory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / "examples"
EXPECTED = {
    "lightning_fit.py": "findings: ['vanishing_gradients'",
    "hf_trainer.py": "steadygrad records in log_history at steps [1, 6, 11, 16]",
    "accelerate_loop.py": "4 logged steps",
    "keras_fit.py": "logged steps [1, 14, 27]",
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert EXPECTED[script] in done.stdout, done.stdout[-2000:]
