r"""The GGN as a linear operator: :class:`GGNOperator`.

The operator multiplies by :math:`G = V V^\top` through the engine's square-root factors
(:mod:`curvkit.factor_products`): for one batch, the factors are formed on the first product and
kept, so that every later product is two contractions; for an iterable of batches, each product
is one pass over the data. ``to_scipy()`` hands it to :mod:`scipy.sparse.linalg`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from curvkit.data import Data, Inputs
from curvkit.factor_products import block_diagonal_matmul
from curvkit.losses import LossFunction
from curvkit.problem import Params, Problem, fill_argument_docs

__all__ = ["GGNOperator"]


@fill_argument_docs
class GGNOperator:
    r"""The GGN as a linear operator on flat vectors, :math:`u \mapsto G u`.

    ``op @ v`` (``v`` of shape ``[D]``) and ``op @ M`` (``M`` of shape ``[D, J]``) multiply by
    the GGN over the flat concatenation of ``params``; ``op.to_scipy()`` wraps it for
    :mod:`scipy.sparse.linalg` (``eigsh``, ``cg``, ...). With param groups, the operator is the
    block-diagonal GGN, one block per group.

    For one batch (per rank), the factors are computed on the first product and kept, so that
    later products cost two contractions each: the operator is the GGN at the parameters' values
    of that first product (build a new operator after changing them). For an iterable of
    batches, each product makes a pass over the data (which must be re-iterable, e.g. a list or
    a DataLoader) at the parameters' current values.

    With ``mc_samples > 0`` the operator is one fixed Monte-Carlo estimate of the GGN: the random
    state is taken at construction and replayed on every pass, so that repeated products see
    the same matrix (this needs the batches to come in the same order on every pass: no
    shuffling DataLoader).

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        mc_samples: {mc_samples}
        generator: Random number generator whose current state seeds the Monte-Carlo samples; a
            seed is drawn from the global generator if ``None``.
        progress: {progress}

    Raises:
        TypeError, ValueError: As :func:`curvkit.ggn.diag_ggn`; ``ValueError`` if ``params`` do
            not share one dtype and device.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        *,
        params: Params = None,
        mc_samples: int = 0,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
    ) -> None:
        self._problem = Problem(
            model,
            loss_fn,
            data,
            params,
            mc_samples=mc_samples,
            generator=generator,
            progress=progress,
            name="GGNOperator",
        )
        first = self._problem.params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self._problem.params):
            raise ValueError(
                "GGNOperator acts on one flat vector, so its parameters must share one dtype and "
                "device; pass params of one dtype and device"
            )
        self._random_state: Tensor | None = None
        if mc_samples > 0:
            if generator is None:
                generator = torch.Generator(device=first.device)
                generator.manual_seed(int(torch.randint(2**62, ()).item()))
            self._random_state = generator.get_state()
            self._generator_device = generator.device
        dim = sum(p.numel() for p in self._problem.params)
        self.shape = (dim, dim)
        self.dtype = first.dtype
        self.device = first.device

    def __repr__(self) -> str:
        mc_samples = self._problem.mc_samples
        kind = "exact" if mc_samples == 0 else f"Monte-Carlo ({mc_samples} samples)"
        return f"GGNOperator(shape={self.shape}, dtype={self.dtype}, device={self.device}, {kind})"

    def __matmul__(self, other: Tensor) -> Tensor:
        """Multiply by a flat vector ``[D]`` or a matrix ``[D, J]``."""
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.dim() not in (1, 2) or other.shape[0] != self.shape[1]:
            raise ValueError(
                f"GGNOperator of shape {self.shape} multiplies tensors of shape [{self.shape[1]}] "
                f"or [{self.shape[1]}, J], got {tuple(other.shape)}"
            )
        Problem.check_like(other, self._problem.params[0], "the operand")
        matrix = other if other.dim() == 2 else other.unsqueeze(1)
        result = self._matmat(matrix)
        return result if other.dim() == 2 else result.squeeze(1)

    def to_scipy(self) -> Any:
        """Return a :class:`scipy.sparse.linalg.LinearOperator` over float64 NumPy arrays.

        Inputs are converted to the operator's dtype and device, results to float64 NumPy: the
        operator is symmetric, so ``rmatvec`` is ``matvec``.

        Raises:
            ImportError: If SciPy is not installed.
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as error:
            raise ImportError("GGNOperator.to_scipy needs SciPy: pip install scipy") from error

        def matmat(array: np.ndarray) -> np.ndarray:
            operand = torch.as_tensor(np.asarray(array), device=self.device).to(self.dtype)
            result = self @ operand.reshape(self.shape[1], -1)
            return result.detach().to("cpu", torch.float64).numpy()

        def matvec(array: np.ndarray) -> np.ndarray:
            return matmat(np.asarray(array).reshape(-1, 1)).reshape(-1)

        return LinearOperator(
            self.shape,
            matvec=matvec,
            rmatvec=matvec,
            matmat=matmat,
            rmatmat=matmat,
            dtype=np.float64,
        )

    def _replay_generator(self) -> None:
        """Give the problem a generator in the state taken at construction."""
        if self._random_state is None:
            return
        generator = torch.Generator(device=self._generator_device)
        generator.set_state(self._random_state)
        self._problem.generator = generator

    def _matmat(self, matrix: Tensor) -> Tensor:
        problem = self._problem
        sizes = [p.numel() for p in problem.params]
        blocks = [
            block.T.reshape(-1, *p.shape)
            for block, p in zip(matrix.split(sizes), problem.params, strict=True)
        ]
        self._replay_generator()

        def batch_product(inputs: Inputs, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
            outputs, factors = problem.factors(inputs, targets, reuse=True)
            product = block_diagonal_matmul(problem.by_group(factors), problem.by_group(blocks))
            return outputs, product

        product = problem.reduce(batch_product, passes=2)
        return torch.cat([p.reshape(p.shape[0], -1) for p in product], dim=1).T
