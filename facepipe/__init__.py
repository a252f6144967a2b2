"""facepipe: a data-and-training pipeline for uncertainty-aware face recognition."""

__version__ = "0.1.0"
