"""Engines: per-parameter square-root factors of the GGN (:mod:`curvkit.engines.factor`)."""

from curvkit.engines.compute import FactorChunk, compute_factors, iter_factors
from curvkit.engines.factor import DenseFactor, Factor, SumFactor, ZeroFactor
from curvkit.engines.kronecker import DEFAULT_CHUNK_BYTES, KroneckerFactor

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DenseFactor",
    "Factor",
    "FactorChunk",
    "KroneckerFactor",
    "SumFactor",
    "ZeroFactor",
    "compute_factors",
    "iter_factors",
]
