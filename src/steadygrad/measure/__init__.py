"""Instruments: how signal and gradient travel through a model (``probe``), as per-layer records."""

from steadygrad.measure.probe import probe, select_layers
from steadygrad.measure.records import FlowReport, LayerRecord

__all__ = ["FlowReport", "LayerRecord", "probe", "select_layers"]
