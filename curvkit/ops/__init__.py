"""Batched numerical operations that know nothing of models."""
