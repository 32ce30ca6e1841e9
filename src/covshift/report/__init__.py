"""Figures (matplotlib, PNG and SVG) and the self-contained HTML report."""

from covshift.report.figures import experiment_figure
from covshift.report.html import write_report

__all__ = ["experiment_figure", "write_report"]
