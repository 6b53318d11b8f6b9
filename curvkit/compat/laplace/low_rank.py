"""laplace-torch's ``LowRankLaplace`` without its check for the ``asdfghjkl`` module.

laplace-torch 0.3's ``LowRankLaplace`` raises an ImportError unless a module named
``asdfghjkl`` is importable, because its default backend came from there. The
``asdfghjkl==0.1a4`` that laplace-torch depends on installs a module named ``asdl`` instead, so
the check fails on a plain ``pip install laplace-torch``, whatever the backend. This subclass
skips the check and defaults to :class:`~curvkit.compat.laplace.CurvkitGGN`; everything else is
laplace-torch's class.
"""

from __future__ import annotations

from typing import Any

import torch
from laplace import LowRankLaplace as _LowRankLaplace
from laplace.baselaplace import ParametricLaplace
from laplace.curvature import CurvatureInterface
from laplace.utils import Likelihood
from torch import nn

from curvkit.compat.laplace.backends import CurvkitGGN

__all__ = ["LowRankLaplace"]


class LowRankLaplace(_LowRankLaplace):
    """laplace-torch's ``LowRankLaplace`` (same arguments), backend :class:`CurvkitGGN`.

    The rank is the backend's ``low_rank`` (``backend_kwargs={"low_rank": k}``, default 10).
    """

    # Its own key, so that laplace.Laplace(..., hessian_structure="lowrank") keeps finding
    # laplace-torch's class (it maps the keys of all subclasses).
    _key = ("all", "lowrank", "curvkit")

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood | str,
        backend: type[CurvatureInterface] = CurvkitGGN,
        sigma_noise: float | torch.Tensor = 1,
        prior_precision: float | torch.Tensor = 1,
        prior_mean: float | torch.Tensor = 0,
        temperature: float = 1,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend_kwargs: dict[str, Any] | None = None,
    ) -> None:
        ParametricLaplace.__init__(
            self,
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
        )
