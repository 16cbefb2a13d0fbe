"""Reports: self-contained HTML pages for the lab, for probes, training runs and (later) sweeps."""

from steadygrad.report.html import Page, Section, write_page
from steadygrad.report.lab_page import write_lab_report

__all__ = ["Page", "Section", "write_lab_report", "write_page"]
