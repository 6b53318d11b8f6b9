"""Running the user's model in eval mode without changing it for good."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module of ``model`` in eval mode for the block, then restore each one's mode.

    laplace-torch calls ``model.eval()`` and leaves it so; curvkit's Laplace needs eval mode as
    much (BatchNorm must not mix samples, dropout must be off) but gives the model back as it was.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in modes:
            module.training = False
        yield
    finally:
        for module, training in modes:
            module.training = training
