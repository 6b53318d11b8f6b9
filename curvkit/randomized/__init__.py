"""Randomized linear algebra on any curvature operator.

Trace and diagonal estimators (:mod:`curvkit.randomized.estimators`), Lanczos and spectral
densities (:mod:`curvkit.randomized.spectral`).
"""
