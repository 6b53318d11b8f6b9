"""Linear operators of curvature.

One base class (:mod:`curvkit.operators.base`) owns the products' data loop; each operator writes
the product of one batch.

:mod:`~curvkit.operators.ggn` (GGN), :mod:`~curvkit.operators.kfac` (KFAC and EKFAC) and
:mod:`~curvkit.operators.inverse` (damped inverses of any operator).
"""
