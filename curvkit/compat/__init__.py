"""Other libraries' APIs by their own names, computed by curvkit.

- :mod:`curvkit.compat.torch_secorder`: torch-secorder's Gauss-Newton diagonal;
- :mod:`curvkit.compat.pyro`: Pyro's ``pyro.optim`` (also importable as ``curvkit.optim.pyro``);
- :mod:`curvkit.compat.vivit`: ViViT's BackPACK-protocol classes (needs BackPACK);
- :mod:`curvkit.compat.laplace`: backends for laplace-torch's own classes (``CurvkitGGN``, ...);
  it needs laplace-torch (the ``laplace`` extra), which ``import curvkit`` never imports.
"""
