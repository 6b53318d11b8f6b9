"""Other libraries' APIs by their own names, computed by curvkit.

- :mod:`curvkit.compat.torch_secorder`: torch-secorder's Gauss-Newton diagonal.

Pyro's optimizers are in :mod:`curvkit.optim.pyro`.
"""
