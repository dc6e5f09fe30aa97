"""overmem: track learning dynamics while finetuning LLMs on reasoning data, detect
over-memorization (Ruan et al. 2025) and choose the checkpoint to keep."""

__version__ = "0.1.0"
