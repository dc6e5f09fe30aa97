"""The HTML report of one or more runs (`overmem report`), from results files only."""

from .build import build_report, write_report

__all__ = ["build_report", "write_report"]
