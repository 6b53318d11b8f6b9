r"""Fitted curvature blocks and the damped inverses that precondition gradients with them.

Each block's curvature is held in the form its inverse is applied in, with eigenvalues
:math:`\lambda` (kronfluence's "Lambda matrix"):

- ``"kronecker"`` (KFAC, EKFAC): eigenvectors :math:`Q_A` ``[G, I, I]``, :math:`Q_B`
  ``[G, O, O]`` and eigenvalues ``[G, O, I]``; a gradient :math:`g` ``[G, O, I]`` becomes
  :math:`Q_B \big((Q_B^\top g Q_A) \oslash (\lambda + \delta)\big) Q_A^\top`;
- ``"dense"`` (the exact block of a small parameter without Kronecker factors): eigenvectors
  :math:`Q` ``[D, D]`` and eigenvalues ``[D]``;
- ``"diagonal"``: the diagonal ``[D]`` (or ``[G, O, I]`` for a layer), :math:`g \oslash
  (\lambda + \delta)`;
- ``"identity"``: nothing; the gradient is left as it is (and the damping ignored).

``damping=None`` is kronfluence's heuristic: :math:`\delta = 0.1\, \overline{\lambda}`, a tenth
of the mean eigenvalue of each block separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.engines import Factor, KroneckerFactor
from curvkit.influence.layout import Block

__all__ = ["HEURISTIC_DAMPING", "BlockCurvature", "InfluenceFactors", "check_damping"]

#: kronfluence's damping heuristic: this fraction of the mean eigenvalue of a block.
HEURISTIC_DAMPING = 0.1

#: The tensors each kind of block holds.
KIND_TENSORS = {
    "kronecker": ("qa", "qb", "values"),
    "dense": ("q", "values"),
    "diagonal": ("values",),
    "identity": (),
}


def check_damping(damping: float | None) -> float | None:
    """Return ``damping`` as a float (``None`` for the heuristic), refusing a bad value.

    Raises:
        ValueError: For a negative, infinite or non-numeric damping.
    """
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, int | float):
        raise ValueError(f"damping must be a non-negative number or None, got {damping!r}")
    if not 0 <= damping < float("inf"):
        raise ValueError(f"damping must be a non-negative number or None, got {damping!r}")
    return float(damping)


@dataclass
class BlockCurvature:
    """One block's fitted curvature (see the module docstring for the kinds).

    Attributes:
        block: Which parameters the block covers and how.
        kind: ``"kronecker"``, ``"dense"``, ``"diagonal"`` or ``"identity"``.
        tensors: The kind's tensors by name.
    """

    block: Block
    kind: str
    tensors: dict[str, Tensor]

    def damping(self, damping: float | None) -> float | Tensor:
        """The block's damping: ``damping``, or the heuristic when it is ``None``."""
        if damping is not None or self.kind == "identity":
            return 0.0 if damping is None else damping
        return HEURISTIC_DAMPING * self.tensors["values"].mean()

    def basis_factor(self, factor: Factor) -> Factor:
        r"""The factor of per-example columns in the basis the block is scaled in.

        That is the eigenbasis of a Kronecker block, whose inputs and output gradients are
        rotated so that a
        column :math:`\sum_t b_t x_t^\top` becomes :math:`\sum_t (Q_B^\top b_t)(Q_A^\top
        x_t)^\top` without ever being formed.
        """
        if self.kind != "kronecker":
            return factor
        assert isinstance(factor, KroneckerFactor)
        qa, qb = self.tensors["qa"], self.tensors["qb"]
        return KroneckerFactor(
            torch.einsum("kntgo,gop->kntgp", factor.output_grads, qb),
            torch.einsum("ntgi,gij->ntgj", factor.inputs, qa),
            factor.param_shape,
            max_chunk_bytes=factor.max_chunk_bytes,
        )

    def scale(self, vectors: Tensor, damping: float | Tensor) -> Tensor:
        """The damped inverse times ``vectors`` ``[J, *block.shape]`` in the block's basis."""
        if self.kind == "identity":
            return vectors
        inverse = 1.0 / (self.tensors["values"] + damping)
        if self.kind == "dense":
            q = self.tensors["q"]
            return ((vectors @ q) * inverse) @ q.T
        return vectors * inverse


class InfluenceFactors:
    """The fitted curvature of every block, reusable across score calls.

    Made by :func:`curvkit.influence.fit.fit_factors`; pass it as ``factors=`` to
    :func:`~curvkit.influence.scores.pairwise_scores` and
    :func:`~curvkit.influence.scores.self_scores` to skip the fit. It belongs to the
    parameters' values at fitting time.

    Attributes:
        curvature: ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"identity"``.
        fisher_type: ``"mc"``, ``"empirical"`` or ``"exact"``.
        mc_samples: Monte-Carlo samples per example (``fisher_type="mc"``).
        num_examples: The number of training examples the curvature averages over.
        blocks: The blocks' curvatures, in the order of the modules.
    """

    def __init__(
        self,
        curvature: str,
        fisher_type: str,
        mc_samples: int,
        num_examples: int,
        blocks: list[BlockCurvature],
    ) -> None:
        self.curvature = curvature
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.num_examples = num_examples
        self.blocks = blocks

    def __repr__(self) -> str:
        kinds = sorted({b.kind for b in self.blocks})
        return (
            f"InfluenceFactors(curvature={self.curvature!r}, fisher_type={self.fisher_type!r}, "
            f"num_examples={self.num_examples}, blocks={len(self.blocks)} ({', '.join(kinds)}))"
        )

    def state_dict(self) -> dict[str, Any]:
        """The settings and tensors, for ``torch.save`` (loads with ``weights_only=True``)."""
        return {
            "curvature": self.curvature,
            "fisher_type": self.fisher_type,
            "mc_samples": self.mc_samples,
            "num_examples": self.num_examples,
            "blocks": [
                {
                    "module": b.block.module,
                    "name": b.block.name,
                    "kronecker": b.block.kronecker,
                    "positions": list(b.block.positions),
                    "shape": list(b.block.shape),
                    "kind": b.kind,
                    "tensors": dict(b.tensors),
                }
                for b in self.blocks
            ],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the settings and tensors by those of :meth:`state_dict`.

        Raises:
            ValueError: If the state is not one :meth:`state_dict` made.
        """
        try:
            blocks = []
            for entry in state_dict["blocks"]:
                block = Block(
                    entry["module"],
                    entry["name"],
                    bool(entry["kronecker"]),
                    tuple(entry["positions"]),
                    tuple(entry["shape"]),
                )
                kind = entry["kind"]
                if set(entry["tensors"]) != set(KIND_TENSORS[kind]):
                    raise ValueError(f"block {block.name!r} lacks tensors of a {kind!r} block")
                blocks.append(BlockCurvature(block, kind, dict(entry["tensors"])))
            settings = (
                str(state_dict["curvature"]),
                str(state_dict["fisher_type"]),
                int(state_dict["mc_samples"]),
                int(state_dict["num_examples"]),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"not a state of InfluenceFactors.state_dict() (missing or wrong {error})"
            ) from error
        self.curvature, self.fisher_type, self.mc_samples, self.num_examples = settings
        self.blocks = blocks

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any]) -> InfluenceFactors:
        """Make factors from :meth:`state_dict` (e.g. ``torch.load(path, weights_only=True)``)."""
        factors = cls("identity", "empirical", 1, 0, [])
        factors.load_state_dict(state_dict)
        return factors
