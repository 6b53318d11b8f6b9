"""Linear operators of curvature.

One base class (:mod:`curvkit.operators.base`) owns the products' data loop; each operator writes
the product of one batch: :mod:`~curvkit.operators.ggn` (GGN), :mod:`~curvkit.operators.ef`
(empirical Fisher), :mod:`~curvkit.operators.hessian` (Hessian), :mod:`~curvkit.operators.kfac`
(KFAC and EKFAC), and :mod:`~curvkit.operators.inverse` (damped inverses of any operator).
"""

# The iterative inverses hand themselves to the base class when imported: importing the package
# makes every operator's ``inverse`` work, whichever module a user imports first.
from curvkit.operators import inverse as inverse
