"""Instruments: how signal and gradient travel through a model, as per-layer records.

``probe`` looks at one step; ``Monitor`` at every logged step of training; both make ``LayerRecord``s.
"""

from steadygrad.measure.layers import select_layers
from steadygrad.measure.monitor import Monitor
from steadygrad.measure.probe import probe
from steadygrad.measure.records import FlowReport, LayerRecord
from steadygrad.measure.sinks import HistorySink, JsonlSink, MLflowSink, TensorBoardSink

__all__ = [
    "FlowReport",
    "HistorySink",
    "JsonlSink",
    "LayerRecord",
    "MLflowSink",
    "Monitor",
    "TensorBoardSink",
    "probe",
    "select_layers",
]
