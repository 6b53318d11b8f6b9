"""Small operators for the estimator, spectrum and inverse tests: matrices with known spectra."""

from __future__ import annotations

import torch
from torch import Tensor

import curvkit
from curvkit.operators.base import CurvatureOperator
from curvkit.testing.zoo import make_case


class DenseOperator(CurvatureOperator):
    """A dense symmetric matrix as a curvkit operator (one flat parameter)."""

    def __init__(self, matrix: Tensor) -> None:
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.param_shapes = [torch.Size([matrix.shape[0]])]
        self.operands: list[tuple[int, ...]] = []

    def _matmat(self, matrix: Tensor) -> Tensor:
        self.operands.append(tuple(matrix.shape))
        return self.matrix @ matrix


def with_spectrum(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """``U diag(eigenvalues) U^T`` for a random orthogonal ``U`` (float64)."""
    generator = torch.Generator().manual_seed(seed)
    size = eigenvalues.numel()
    basis = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64)).Q
    return (basis * eigenvalues) @ basis.T


def ggn_operator(batch_size: int = 7, params: str = "all") -> curvkit.GGNOperator:
    """The GGN of the zoo's MLP (cross-entropy, mean) on ``batch_size`` samples, float64."""
    case = make_case("mlp", batch_size)
    parameters = list(case.model.parameters())
    groups = (
        [{"params": parameters[:2]}, {"params": parameters[2:]}] if params == "groups" else None
    )
    return curvkit.GGNOperator(
        case.model, case.loss_fn, (case.inputs[0], case.targets), params=groups
    )
