r"""laplace-torch's parametric Laplace approximations by their own names, on curvkit's engine.

Code written for laplace-torch runs with its import changed::

    from curvkit.laplace import Laplace

    la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="diag")
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")
    probs = la(x_test, pred_type="glm", link_approx="probit")

The posterior precision is :math:`P = H / (\sigma^2 T) + P_0` with :math:`H` the curvature of the
summed negative log likelihood from curvkit's public quantities (:mod:`.curvature`), in one of
four structures over all, the last layer's, or a subnetwork's parameters. Only curvkit's core is
needed (no laplace-torch, curvlinops, asdl or torchmetrics). Beyond laplace-torch: Hugging Face
dict batches, LayerNorm/BatchNorm (eval)/Embedding in ``kron`` (exact blocks where no Kronecker
factors exist), frozen parameters excluded, progress bars on long fits, the model left unchanged,
and a GLM predictive whose Jacobian never exceeds ``max_memory`` (:mod:`.functional`).

Modules: :mod:`.laplace` (the factory), :mod:`.baselaplace` (shared machinery),
:mod:`.structures` (full, diag, kron, lowrank), :mod:`.lllaplace` (last layer),
:mod:`.subnetlaplace` (subnetwork), :mod:`.curvature`, :mod:`.kron`, :mod:`.functional` (GLM
moments), :mod:`.links` (link approximations), :mod:`.tuning` (prior precision),
:mod:`.marglik_training`.
"""

from curvkit.laplace.baselaplace import BaseLaplace, ParametricLaplace
from curvkit.laplace.kron import Kron, KronDecomposed
from curvkit.laplace.laplace import Laplace
from curvkit.laplace.lllaplace import DiagLLLaplace, FullLLLaplace, KronLLLaplace, LLLaplace
from curvkit.laplace.marglik_training import marglik_training
from curvkit.laplace.structures import DiagLaplace, FullLaplace, KronLaplace, LowRankLaplace
from curvkit.laplace.subnetlaplace import DiagSubnetLaplace, FullSubnetLaplace, SubnetLaplace

__all__ = [
    "BaseLaplace",
    "DiagLLLaplace",
    "DiagLaplace",
    "DiagSubnetLaplace",
    "FullLLLaplace",
    "FullLaplace",
    "FullSubnetLaplace",
    "Kron",
    "KronDecomposed",
    "KronLLLaplace",
    "KronLaplace",
    "LLLaplace",
    "Laplace",
    "LowRankLaplace",
    "ParametricLaplace",
    "SubnetLaplace",
    "marglik_training",
]
