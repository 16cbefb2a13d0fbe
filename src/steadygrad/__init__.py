"""steadygrad: keep gradients steady through deep networks.

Verified, drop-in parts for the classic remedies for vanishing and exploding gradients (initialization,
normalization, skip connections, clipping), instruments that measure how signal and gradient travel
through a model, and a lab that reproduces the field's claims.

    import steadygrad as sg
    sg.init.init_model(model, "he_normal")             # every layer matched to its activation
    sg.clip.clip_grads_(model, mode="agc", threshold=0.01)
    report = sg.probe(model, x, y)                     # one step's per-layer records
    findings = sg.diagnose(report, model=model)        # what is wrong, with the fixes to try

``steadygrad.diagnose`` and ``steadygrad.doctor`` are the functions; their modules stay importable by their
full names (``from steadygrad.diagnose import Finding``).
"""

from importlib.metadata import PackageNotFoundError, version

from steadygrad import clip, fast, init, norm, theory
from steadygrad.clip import clip_grads_
from steadygrad.coord import CoordCheck, coord_check

# Last: binding the function replaces the attribute that importing the submodule ``steadygrad.diagnose`` set.
from steadygrad.diagnose import diagnose
from steadygrad.doctor import doctor
from steadygrad.init import init_model
from steadygrad.measure import FlowReport, LayerRecord, MLflowSink, Monitor, probe
from steadygrad.nets import NetSpec, build
from steadygrad.train import TrainConfig, Trainer

try:
    __version__ = version("steadygrad")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CoordCheck",
    "FlowReport",
    "LayerRecord",
    "MLflowSink",
    "Monitor",
    "NetSpec",
    "TrainConfig",
    "Trainer",
    "__version__",
    "build",
    "clip",
    "clip_grads_",
    "coord_check",
    "diagnose",
    "doctor",
    "fast",
    "init",
    "init_model",
    "norm",
    "probe",
    "theory",
]
