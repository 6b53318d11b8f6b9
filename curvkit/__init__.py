"""curvkit: second-order curvature of PyTorch models."""

__version__ = "0.1.0"
