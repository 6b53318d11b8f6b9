"""Other libraries' APIs by their own names, computed by curvkit.

- :mod:`curvkit.compat.torch_secorder`: torch-secorder's Gauss-Newton diagonal.
- :mod:`curvkit.compat.laplace`: backends for laplace-torch's own classes (``CurvkitGGN``, ...);
  it needs laplace-torch (the ``laplace`` extra), which ``import curvkit`` never imports.

Pyro's optimizers are in :mod:`curvkit.optim.pyro`.
"""
