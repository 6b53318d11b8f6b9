"""Aids for checking curvkit's numbers.

Plain-autograd references and comparison reports (:mod:`curvkit.testing.verify`) and a zoo of
small models and losses (:mod:`curvkit.testing.zoo`).
"""
