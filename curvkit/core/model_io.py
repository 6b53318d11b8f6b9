r"""How curvkit calls a model and reads its outputs, and what a sample is.

- **Inputs** are one tensor (``model(x)``), a tuple of positional inputs (``model(*inputs)``) or
  a mapping of keyword inputs (``model(**inputs)``: a tokenizer's ``input_ids`` and
  ``attention_mask``).
- **Outputs** are one tensor, or an object with ``logits`` (a Hugging Face ``ModelOutput``):
  curvkit takes its logits.
- A **sample** is a row of the input batch: the input tensors hold the :math:`N` samples along
  their first axis. The outputs hold them along their first axis too, either one row per sample
  (``[N, ...]``) or the rows of each sample one after the other (``[N T, ...]``: a language
  model's logits flattened over the positions, as Hugging Face's loss code and curvlinops'
  examples do). For a language model, a sample is a sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from torch import Tensor, nn
from torch.utils import _pytree as pytree

__all__ = [
    "Inputs",
    "call_model",
    "input_tensors",
    "num_input_samples",
    "output_tensor",
    "sample_layout",
    "select_samples",
]

Inputs: TypeAlias = Tensor | tuple[Any, ...] | Mapping[str, Any]


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple, ``model(**inputs)`` for a mapping."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def output_tensor(outputs: Any) -> Tensor:
    """The model's output as one tensor: itself, or the ``logits`` of a ``ModelOutput``.

    Raises:
        TypeError: For anything else, or a tensor without a sample axis.
    """
    if not isinstance(outputs, Tensor):
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if logits is None:
            logits = getattr(outputs, "logits", None)
        if isinstance(logits, Tensor):
            outputs = logits
    if not isinstance(outputs, Tensor) or outputs.dim() == 0:
        raise TypeError(
            "the model must return one tensor whose first axis indexes the samples (or an "
            "object with `logits`, such as a Hugging Face ModelOutput), got "
            f"{type(outputs).__name__}"
            + (f" of shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor) else "")
        )
    return outputs


def input_tensors(inputs: Inputs) -> list[Tensor]:
    """The tensors among the inputs, in order."""
    return [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, Tensor)]


def num_input_samples(inputs: Inputs) -> int | None:
    """:math:`N`: the first axis of the first input tensor with one, ``None`` without any."""
    for tensor in input_tensors(inputs):
        if tensor.dim() > 0:
            return tensor.shape[0]
    return None


def sample_layout(inputs: Inputs, outputs: Tensor) -> tuple[int, int]:
    """``(N, rows per sample)`` of a batch's outputs (see the module docstring).

    The outputs have one row per sample unless no input tensor has as many rows as the outputs
    while the first one's rows divide them: then each sample has ``outputs.shape[0] / N``
    consecutive rows.
    """
    rows = outputs.shape[0]
    sizes = [t.shape[0] for t in input_tensors(inputs) if t.dim() > 0]
    if not sizes or rows in sizes or rows % sizes[0] != 0 or sizes[0] == 0:
        return rows, 1
    return sizes[0], rows // sizes[0]


def select_samples(inputs: Inputs, index: slice, num_samples: int) -> Inputs:
    """The inputs of the samples ``index``: every input tensor with ``N`` rows, indexed."""

    def select(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == num_samples:
            return leaf[index]
        return leaf

    return pytree.tree_map(select, inputs)
