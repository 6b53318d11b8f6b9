"""A coupled quadratic over parameters of shapes (2,), (3, 2), (4, 2), for the optimizer tests."""

from __future__ import annotations

import torch
from torch import Tensor

SHAPES = {"a": (2,), "b": (3, 2), "c": (4, 2)}


class CoupledQuadratic:
    r"""L(z) = 0.5 z^T Q z - b^T z + theta * sum(cos z) over z = concat of the flattened parameters.

    Q is block diagonal in the 2x2 blocks of the last dimension of every parameter (dense SPD
    blocks), plus a small symmetric coupling between *different* parameters only, so that a
    per-parameter Newton step (which treats a parameter's leading dims as independent) is a
    convergent block-Jacobi iteration. With ``theta = 0`` the minimiser is Q^{-1} b.
    """

    def __init__(self, coupling: float = 0.05, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        kw = {"dtype": torch.float64}
        self.sizes = {name: int(torch.Size(shape).numel()) for name, shape in SHAPES.items()}
        n = sum(self.sizes.values())
        q = torch.zeros(n, n, **kw)
        for start in range(0, n, 2):
            m = torch.randn(2, 2, generator=gen, **kw)
            q[start : start + 2, start : start + 2] = m @ m.T + torch.eye(2, **kw)
        owner = torch.cat([torch.full((size,), i) for i, size in enumerate(self.sizes.values())])
        cross = owner[:, None] != owner[None, :]
        e = torch.randn(n, n, generator=gen, **kw) * cross
        q = q + coupling * (e + e.T) / 2
        self.q = q
        self.b = torch.randn(n, generator=gen, **kw)
        self.jacobi_radius = self._block_jacobi_radius(cross)
        assert torch.linalg.eigvalsh(q).min() > 0.5
        self.minimiser = self.unflatten(torch.linalg.solve(q, self.b))

    def _block_jacobi_radius(self, cross: Tensor) -> float:
        diagonal = self.q * ~cross
        iteration = torch.linalg.solve(diagonal, self.q * cross)
        return float(torch.linalg.eigvals(iteration).abs().max())

    def unflatten(self, z: Tensor) -> dict[str, Tensor]:
        parts = torch.split(z, list(self.sizes.values()))
        return {name: part.reshape(SHAPES[name]) for name, part in zip(SHAPES, parts, strict=True)}

    def loss(self, params: dict[str, Tensor], theta: Tensor | float = 0.0) -> Tensor:
        z = torch.cat([params[name].reshape(-1) for name in SHAPES])
        return 0.5 * z @ self.q @ z - self.b @ z + theta * torch.cos(z).sum()

    def start(self, seed: int = 1) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {
            name: torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
            for name, shape in SHAPES.items()
        }

    def error(self, params: dict[str, Tensor]) -> float:
        return max(float((params[n].detach() - self.minimiser[n]).abs().max()) for n in SHAPES)
