"""laplace-torch's data conventions on curvkit's: tuple or dict batches, and the dataset size.

laplace-torch's loaders yield ``(X, y)`` or a dict holding the targets under ``dict_key_y``, and
call the model as ``model(X)``, with the whole dict for dict batches. curvkit calls
``model(**inputs)`` for dict inputs, so dict batches go through :class:`MappingInputModel`, a
wrapper that hands the dict on as one argument: the user's model is not changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LaplaceData", "MappingInputModel", "dataset_size"]


class MappingInputModel(nn.Module):
    """Calls ``model(dict(inputs))`` for curvkit's ``model(**inputs)``.

    Args:
        model: The user's model, which takes one dict.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> Any:
        """Run the wrapped model on the keyword inputs gathered into one dict."""
        return self.model(dict(inputs))


def dataset_size(loader: Iterable[Any], counted: int) -> int:
    """The :math:`N` of laplace-torch: ``len(loader.dataset)``, else the samples seen."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else counted
    except TypeError:
        return counted


class LaplaceData:
    """Turns laplace-torch batches into curvkit batches ``(inputs, targets)`` on a device.

    Args:
        model: The user's model.
        dict_key_y: The key of the targets in dict batches.
        device: Where the model's parameters live.
    """

    def __init__(self, model: nn.Module, dict_key_y: str, device: torch.device) -> None:
        self.model = model
        self.mapping_model = MappingInputModel(model)
        self.dict_key_y = dict_key_y
        self.device = device

    def inputs(self, x: Any) -> tuple[nn.Module, Any]:
        """The model to call and its curvkit inputs for laplace-torch inputs ``x``."""
        if isinstance(x, Mapping):
            kept = {k: _to(v, self.device) for k, v in x.items() if k != self.dict_key_y}
            return self.mapping_model, kept
        return self.model, _to(x, self.device)

    def batch(self, data: Any) -> tuple[nn.Module, tuple[Any, Tensor]]:
        """The model and the curvkit batch for one laplace-torch batch."""
        if isinstance(data, Mapping):
            if self.dict_key_y not in data:
                raise ValueError(
                    f"a dict batch must hold its targets under {self.dict_key_y!r} "
                    "(dict_key_y); got the keys " + ", ".join(map(repr, data))
                )
            model, inputs = self.inputs(data)
            return model, (inputs, _to(data[self.dict_key_y], self.device))
        if not isinstance(data, (tuple, list)) or len(data) != 2:
            raise TypeError(
                "each batch must be a pair (X, y) or a dict holding the targets under "
                f"{self.dict_key_y!r}, got {type(data).__name__}"
            )
        x, y = data
        model, inputs = self.inputs(x)
        return model, (inputs, _to(y, self.device))

    def loader(self, loader: Iterable[Any]) -> tuple[nn.Module, _Batches]:
        """The model and a re-iterable view of ``loader`` in curvkit batches."""
        first = next(iter(loader), None)
        if first is None:
            raise ValueError("the training data is empty: pass a loader with at least one batch")
        model, _ = self.batch(first)
        return model, _Batches(self, loader)


class _Batches:
    """A re-iterable view of a loader whose batches come out in curvkit's form."""

    def __init__(self, data: LaplaceData, loader: Iterable[Any]) -> None:
        self._data = data
        self._loader = loader

    def __iter__(self) -> Iterator[tuple[Any, Tensor]]:
        for batch in self._loader:
            yield self._data.batch(batch)[1]

    def __len__(self) -> int:
        return len(self._loader)  # type: ignore[arg-type]


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    return value
