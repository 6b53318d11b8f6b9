r"""Engines: per-parameter square-root factors of the GGN (:mod:`curvkit.engines.factor`).

:func:`compute_factors` runs a model forward once with temporary hooks and pushes the columns
of the loss Hessian's square root back in one batched backward pass; it returns one
:class:`Factor` per parameter. Linear and convolution weights get a structured
:class:`KroneckerFactor`, embedding tables an :class:`EmbeddingFactor`, normalisation layers
(LayerNorm, RMSNorm, GroupNorm) a :class:`DenseFactor` from their normalised input; every other
module owning parameters goes through a generic :mod:`torch.func` rule (a :class:`DenseFactor`); a
parameter used several times gets the sum of its uses; a parameter the outputs do not depend on
gets a :class:`ZeroFactor`.

.. rubric:: The user's model

Every forward pass of the engine runs under :func:`curvkit.engines.guard.model_guard`: compiled
models run their uncompiled code; the user's backward hooks never run in the engine's backward
passes; the user's forward (pre-)hooks run once in the forward pass over each batch (and each
chunk of samples) and not in the engine's probe pass of the first sample
(:func:`curvkit.engines.safety.probe_first_sample`), unless the outputs differ without them;
buffers changed by a module in training mode are restored and the call refused. Nothing of it
outlasts the pass.

.. rubric:: Rules

Which factor a module call gets is decided by the rule registered for the module's exact class
(:mod:`curvkit.engines.registry`): :func:`register_rule` adds one for any class, a user's own
layer included, with the signature ``rule(call: RuleCall) -> dict[str, Factor]``; a rule that
cannot handle a call raises :class:`Decline` and the generic rule takes over.

.. rubric:: Memory

With :math:`K` columns, :math:`N` samples and :math:`D` parameters, :func:`compute_factors`
holds the recorded module inputs, the backpropagated columns at every recorded module output
(:math:`K` times the activations) and the factors (for generic modules, :math:`K N D_p`
numbers per parameter). Two knobs bound the rest:

- ``max_chunk_bytes`` (default :data:`DEFAULT_CHUNK_BYTES`, 256 MiB) bounds the intermediate
  tensors that factor methods materialise at once (per-sample gradients of a convolution
  weight for its diagonal, pairwise products over positions) and the per-sample batch of the
  generic rule: they are processed in chunks of samples;
- :func:`iter_factors` splits the batch into chunks of samples (``sample_chunk_size``) and of
  columns (``column_chunk_size``) and yields the factors of each chunk. Quantities that are
  sums over columns (the GGN diagonal, :math:`V V^\top u`) add up over chunks; peak memory
  then scales with the chunk, not the batch.
"""

from curvkit.engines.compute import FactorChunk, compute_factors, iter_factors
from curvkit.engines.embedding import EmbeddingFactor
from curvkit.engines.factor import DenseFactor, Factor, SumFactor, ZeroFactor
from curvkit.engines.kronecker import DEFAULT_CHUNK_BYTES, KroneckerFactor
from curvkit.engines.registry import (
    Decline,
    Rule,
    RuleCall,
    RuleHandle,
    register_rule,
    rule_for,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Decline",
    "DenseFactor",
    "EmbeddingFactor",
    "Factor",
    "FactorChunk",
    "KroneckerFactor",
    "Rule",
    "RuleCall",
    "RuleHandle",
    "SumFactor",
    "ZeroFactor",
    "compute_factors",
    "iter_factors",
    "register_rule",
    "rule_for",
]
