"""Newton's method per parameter, for batches of small independent problems."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from curvkit.core.validation import check_real
from curvkit.ops.newton import newton_step
from curvkit.optim.multi import MultiOptimizer, check_loss, check_params


class Newton(MultiOptimizer):
    r"""A Newton step per parameter, each treated as a batch of small independent problems.

    A parameter of shape ``(..., D)`` holds one ``D``-dimensional problem per batch element; its
    per-item Hessians come from ``D`` backward passes (see :func:`curvkit.ops.newton.newton_step`
    for the step, its trust region and its derivatives). Different parameters are stepped
    jointly from the same point: with losses that couple them, this is a block-Jacobi iteration.

    :meth:`get_step` returns ``x.detach() + dx`` with ``dx`` differentiable through the gradient
    and the Hessian: at convergence, the implicit-function derivative of the minimiser with
    respect to everything else the loss depends on. :meth:`~MultiOptimizer.step` applies the
    step detached.

    Example:
        >>> optim = Newton(trust_radii={"weights": 1.0})
        >>> for _ in range(10):
        ...     optim.step(neg_log_posterior(weights), {"weights": weights})

    Args:
        trust_radii: A dict name -> trust radius (a positive number bounding every item's step
            length). Parameters without one take the plain Newton step.

    Raises:
        TypeError: If ``trust_radii`` is not a dict of names to numbers.
        ValueError: If a trust radius is not positive and finite.
    """

    def __init__(self, trust_radii: Mapping[str, float] | None = None) -> None:
        trust_radii = {} if trust_radii is None else trust_radii
        if not isinstance(trust_radii, Mapping):
            raise TypeError(
                "trust_radii must be a dict name -> radius or None, "
                f"got {type(trust_radii).__name__}."
            )
        for name, radius in trust_radii.items():
            if not isinstance(name, str):
                raise TypeError(f"trust_radii must map names (str) to numbers, got {name!r}.")
            # No trust region for a name: leave the name out.
            check_real(radius, f"the trust radius of {name!r}", minimum=0.0, strict=True)
        self.trust_radii = dict(trust_radii)

    def get_step(self, loss: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Compute every parameter's Newton update, differentiably.

        Args:
            loss: A scalar: the sum of independent per-item terms over each parameter's leading
                dimensions.
            params: A dict name -> tensor of shape ``(..., D)`` that requires grad.

        Returns:
            A dict name -> ``x.detach() + dx``.

        Raises:
            ValueError: If ``trust_radii`` names a parameter that is not in ``params`` (a
                misspelt name would otherwise silently leave a parameter without its trust
                region).
        """
        check_loss(loss)
        params = check_params(params)
        unknown = set(self.trust_radii) - set(params)
        if unknown:
            raise ValueError(
                f"trust_radii names {sorted(unknown)}, which are not among the parameters "
                f"{sorted(params)}."
            )
        return {
            name: newton_step(loss, value, self.trust_radii.get(name))[0]
            for name, value in params.items()
        }
