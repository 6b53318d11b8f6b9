"""Optimizers: the MultiOptimizer family, per-parameter optimizers and curvature-based steps."""
