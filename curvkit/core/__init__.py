"""The bottom layer: what every other layer uses and which knows nothing of curvature.

- :mod:`curvkit.core.data`: batches, iterables of batches, the reduce over them and over
  :mod:`torch.distributed` ranks, progress bars;
- :mod:`curvkit.core.groups`: ``torch.optim``-style parameter groups, normalised once;
- :mod:`curvkit.core.model_io`: how a model is called and what a sample of its output is;
- :mod:`curvkit.core.validation`: the checks of integer, real and damping arguments.
"""
