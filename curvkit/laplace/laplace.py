"""``Laplace(model, likelihood, subset_of_weights, hessian_structure)``: pick the class by names."""

from __future__ import annotations

from typing import Any

from torch import nn

from curvkit.laplace.baselaplace import ParametricLaplace
from curvkit.laplace.lllaplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace
from curvkit.laplace.structures import DiagLaplace, FullLaplace, KronLaplace, LowRankLaplace
from curvkit.laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace

__all__ = ["Laplace"]

_CLASSES: dict[tuple[str, str], type[ParametricLaplace]] = {
    cls._key: cls
    for cls in (
        FullLaplace,
        DiagLaplace,
        KronLaplace,
        LowRankLaplace,
        FullLLLaplace,
        DiagLLLaplace,
        KronLLLaplace,
        FullSubnetLaplace,
        DiagSubnetLaplace,
    )
}


def Laplace(
    model: nn.Module,
    likelihood: str,
    subset_of_weights: str = "last_layer",
    hessian_structure: str = "kron",
    *args: Any,
    **kwargs: Any,
) -> ParametricLaplace:
    """A Laplace approximation chosen by laplace-torch's names.

    Args:
        model: The trained network.
        likelihood: ``"classification"``, ``"regression"`` or ``"reward_modeling"``.
        subset_of_weights: ``"last_layer"``, ``"subnetwork"`` (needs ``subnetwork_indices``) or
            ``"all"``.
        hessian_structure: ``"diag"``, ``"kron"``, ``"full"`` or ``"lowrank"`` (``"all"`` only;
            subnetworks take ``"full"`` or ``"diag"``). The function-space ``"gp"`` is not here.
        *args: Passed to the class.
        **kwargs: Passed to the class (``sigma_noise``, ``prior_precision``, ``prior_mean``,
            ``temperature``, ``backend``, ``backend_kwargs``, ``max_memory``, ...).

    Returns:
        One of :class:`FullLaplace`, :class:`DiagLaplace`, :class:`KronLaplace`,
        :class:`LowRankLaplace`, :class:`FullLLLaplace`, :class:`DiagLLLaplace`,
        :class:`KronLLLaplace`, :class:`FullSubnetLaplace`, :class:`DiagSubnetLaplace`.

    Raises:
        ValueError: For an unknown or unsupported combination.
    """
    subset = getattr(subset_of_weights, "value", subset_of_weights)
    structure = getattr(hessian_structure, "value", hessian_structure)
    if subset == "subnetwork" and structure not in ("full", "diag"):
        raise ValueError("Subnetwork Laplace requires a full or diagonal Hessian approximation!")
    if kwargs.pop("functional_approximation", "sod") not in ("sod",) or structure == "gp":
        raise ValueError(
            "the function-space Laplace approximations (hessian_structure='gp', ELLA, VaLLA) are "
            "not in curvkit.laplace: use laplace-torch for them"
        )
    try:
        cls = _CLASSES[(subset, structure)]
    except KeyError:
        raise ValueError(
            f"Unsupported Laplace combination: {subset}, {structure}. Known: "
            + ", ".join(f"{s}/{h}" for s, h in _CLASSES)
        ) from None
    return cls(model, likelihood, *args, **kwargs)
