"""The curvature quantities, written once against the engine's :class:`~curvkit.engines.Factor`.

Each public function opens one call context (:mod:`curvkit.quantities.context`), which validates
its arguments and owns the loop over the data; the quantity itself only combines factors:
:mod:`~curvkit.quantities.ggn` (GGN diagonal, products, columns, dense GGN),
:mod:`~curvkit.quantities.directional` (eigenpairs, directional derivatives, damped Newton
steps, with the Gram-space algebra in :mod:`~curvkit.quantities.gram_eigen`),
:mod:`~curvkit.quantities.first_order` (per-sample gradients, empirical Fisher),
:mod:`~curvkit.quantities.hessian`, :mod:`~curvkit.quantities.kfac` (Kronecker factors).
"""
