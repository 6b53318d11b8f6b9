"""Engines: per-parameter square-root factors of the GGN (:mod:`curvkit.engines.factor`)."""
