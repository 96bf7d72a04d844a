"""graphs: what is exported. Plain PyTorch modules and the math they need (no export logic)."""
from .dse import dse_matrix

__all__ = ["dse_matrix"]
