r"""Training-data attribution with influence functions (kronfluence's conventions).

:func:`pairwise_scores` scores every training example by its influence on every query,
:math:`g_q^\top (C + \delta I)^{-1} g_t`; :func:`self_scores` gives each training example's
influence on itself; :func:`fit_factors` fits the curvature :math:`C` once for several calls
(:class:`InfluenceFactors`, saved and loaded through ``state_dict``).
"""

from __future__ import annotations

from curvkit.influence.factors import InfluenceFactors
from curvkit.influence.fit import fit_factors
from curvkit.influence.scores import pairwise_scores, self_scores

__all__ = ["InfluenceFactors", "fit_factors", "pairwise_scores", "self_scores"]
