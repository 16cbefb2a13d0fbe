"""The frameworks are extras: ``import steadygrad`` imports none of them, and a missing one names its extra."""

import subprocess
import sys

import pytest

from steadygrad.integrations._core import require

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "keras", "mlflow")


def test_import_steadygrad_imports_no_framework():
    code = (
        "import sys, steadygrad, steadygrad.measure, steadygrad.integrations; "
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_missing_framework_names_its_extra():
    with pytest.raises(ImportError, match=r"pip install 'steadygrad\[lightning\]'"):
        require("no_such_framework_here", "lightning", "steadygrad.integrations.lightning")
