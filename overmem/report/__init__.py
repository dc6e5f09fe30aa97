"""The HTML report of one or more runs (`overmem report`), from results files only."""

from .build import REPORT, build_report, write_report

__all__ = ["REPORT", "build_report", "write_report"]
