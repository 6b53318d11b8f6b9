r"""The curvature of a Laplace fit, from curvkit's public quantities on the summed loss.

For the log likelihood :math:`-c \sum_n \ell_n` (:mod:`curvkit.laplace.likelihood`: :math:`c = 1`
for cross-entropy, :math:`1/2` for the squared error) the Laplace posterior precision holds the
curvature of :math:`c \sum_n \ell_n` over the training data, in one of four structures:

- ``diag``: :func:`curvkit.diag_ggn` (exact; Monte-Carlo with ``stochastic=True``),
  :func:`curvkit.diag_ef`, :func:`curvkit.diag_hessian`;
- ``full``: :func:`curvkit.ggn_matrix` (:class:`curvkit.GGNOperator` with Monte-Carlo samples),
  :class:`curvkit.EFOperator`, :func:`curvkit.hessian_matrix`;
- ``kron``: :class:`curvkit.KFACOperator`'s factors over the whole data in one pass
  (:math:`A` the average of the inputs' outer products over all samples, :math:`B` the sum over
  the samples, the factor :math:`c` split as :math:`\sqrt c` on each; parameters without
  Kronecker factors get their exact block) -- laplace-torch's scaling, for any batch sizes;
- ``lowrank``: the top eigenpairs of the GGN (:func:`curvkit.ggn_eigh`, exact, through the Gram
  matrix of the square-root factor).

Which curvature: ``"ggn"`` (default), ``"ef"`` (empirical Fisher) or ``"hessian"``, chosen from
laplace-torch's ``backend`` argument (:func:`resolve_backend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import curvkit
from curvkit.core.data import is_batch
from curvkit.core.model_io import call_model, output_tensor
from curvkit.laplace.kron import Kron
from curvkit.laplace.likelihood import summed_loss

__all__ = ["CURVATURES", "Curvature", "resolve_backend"]

#: Numbers per chunk of unit vectors in :meth:`Curvature.full_subset`.
SUBSET_CHUNK_ELEMENTS = 2**24

#: The curvatures a Laplace fit can use.
CURVATURES = ("ggn", "ef", "hessian")


def resolve_backend(backend: Any, backend_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Map laplace-torch's ``backend`` and ``backend_kwargs`` onto curvkit's options.

    Args:
        backend: ``None`` or ``"ggn"`` (the GGN), ``"ef"`` (empirical Fisher), ``"hessian"``, or a
            laplace-torch backend class, read by its name (``...EF`` -> ``"ef"``,
            ``...Hessian`` -> ``"hessian"``, any other -> ``"ggn"``).
        backend_kwargs: ``stochastic`` (Monte-Carlo GGN), ``num_samples``/``mc_samples``
            (samples per data point, default 1), ``low_rank`` (rank of ``lowrank``, default 10),
            ``kfac_approx`` (``"expand"``/``"reduce"``); other laplace-torch options are ignored.

    Returns:
        ``{"kind", "mc_samples", "low_rank", "kfac_approx"}``.

    Raises:
        ValueError: For an unknown backend name or an invalid option.
    """
    options = dict(backend_kwargs or {})
    if backend is None:
        kind = "ggn"
    elif isinstance(backend, str):
        kind = backend.lower()
    else:
        name = getattr(backend, "__name__", type(backend).__name__)
        kind = "ef" if name.endswith("EF") else "hessian" if "Hessian" in name else "ggn"
    if kind not in CURVATURES:
        raise ValueError(f"unknown backend {backend!r}: use one of {CURVATURES} or None")
    samples = options.get("mc_samples", options.get("num_samples", 1))
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"the number of Monte-Carlo samples must be a positive int, got {samples}")
    stochastic = bool(options.get("stochastic", False))
    if stochastic and kind != "ggn":
        raise ValueError("stochastic=True is the Monte-Carlo GGN: use it with the GGN backend")
    return {
        "kind": kind,
        "mc_samples": samples if stochastic else 0,
        "low_rank": int(options.get("low_rank", 10)),
        "kfac_approx": options.get("kfac_approx", "expand"),
    }


@dataclass
class Curvature:
    """One curvature of a model restricted to some of its parameters.

    Attributes:
        model: The model curvkit calls (``model(inputs)``).
        likelihood: ``"classification"`` or ``"regression"``.
        params: The parameters, in the Laplace approximation's order.
        kind: ``"ggn"``, ``"ef"`` or ``"hessian"``.
        mc_samples: Monte-Carlo samples per data point (``0``: exact).
        kfac_approx: ``"expand"`` or ``"reduce"`` for ``kron``.
        generator: Random numbers for the Monte-Carlo samples.
        progress: Progress bars over the batches (``None``: for long loops).
        max_memory: Memory budget in bytes for curvkit's columns (``None``: its default).
    """

    model: nn.Module
    likelihood: str
    params: Sequence[Tensor]
    kind: str = "ggn"
    mc_samples: int = 0
    kfac_approx: str = "expand"
    generator: torch.Generator | None = None
    progress: bool | None = None
    max_memory: int | None = None

    def __post_init__(self) -> None:
        self.loss_fn, self.factor = summed_loss(self.likelihood)

    def _flat(self, parts: list[Tensor]) -> Tensor:
        return torch.cat([p.reshape(-1) for p in parts])

    @torch.no_grad()
    def loss(self, data: Any) -> tuple[Tensor, int]:
        """``factor`` times the summed loss over ``data`` and the number of samples."""
        batches = [data] if is_batch(data) else data
        total = torch.zeros((), dtype=self.params[0].dtype, device=self.params[0].device)
        count = 0
        for inputs, targets in batches:
            outputs = output_tensor(call_model(self.model, inputs))
            total = total + self.loss_fn(outputs, targets)
            count += outputs.shape[0]
        return self.factor * total, count

    def diag(self, data: Any) -> Tensor:
        """The diagonal ``[P]``."""
        common = {"params": list(self.params), "progress": self.progress}
        if self.kind == "ef":
            parts = curvkit.diag_ef(self.model, self.loss_fn, data, **common)
        elif self.kind == "hessian":
            parts = curvkit.diag_hessian(self.model, self.loss_fn, data, **common)
        else:
            parts = curvkit.diag_ggn(
                self.model,
                self.loss_fn,
                data,
                mc_samples=self.mc_samples,
                generator=self.generator,
                max_memory=self.max_memory,
                **common,
            )
        return self.factor * self._flat(parts)

    def full(self, data: Any) -> Tensor:
        """The dense matrix ``[P, P]``."""
        common = {"params": list(self.params), "progress": self.progress}
        if self.kind == "ef":
            dense = curvkit.EFOperator(self.model, self.loss_fn, data, **common).to_dense()
        elif self.kind == "hessian":
            dense = curvkit.hessian_matrix(self.model, self.loss_fn, data, **common)
        elif self.mc_samples:
            op = curvkit.GGNOperator(
                self.model,
                self.loss_fn,
                data,
                mc_samples=self.mc_samples,
                generator=self.generator,
                max_memory=self.max_memory,
                **common,
            )
            dense = op.to_dense()
        else:
            dense = curvkit.ggn_matrix(
                self.model, self.loss_fn, data, max_memory=self.max_memory, **common
            )
        return self.factor * dense

    def _operator(self, data: Any) -> Any:
        common = {"params": list(self.params), "progress": self.progress}
        if self.kind == "ef":
            return curvkit.EFOperator(self.model, self.loss_fn, data, **common)
        if self.kind == "hessian":
            return curvkit.HessianOperator(self.model, self.loss_fn, data, **common)
        return curvkit.GGNOperator(
            self.model,
            self.loss_fn,
            data,
            mc_samples=self.mc_samples,
            generator=self.generator,
            max_memory=self.max_memory,
            **common,
        )

    def full_subset(self, data: Any, indices: Tensor) -> Tensor:
        """The dense block ``[k, k]`` of the entries ``indices`` of the flat parameters.

        Its columns are products of the operator with unit vectors, a chunk at a time (each
        chunk ``[P, j]`` within :data:`SUBSET_CHUNK_ELEMENTS` numbers).
        """
        op = self._operator(data)
        total = sum(p.numel() for p in self.params)
        ref = self.params[0]
        index = indices.to(ref.device)
        chunk = max(1, SUBSET_CHUNK_ELEMENTS // total)
        columns = []
        for start in range(0, len(index), chunk):
            part = index[start : start + chunk]
            units = torch.zeros(total, len(part), dtype=ref.dtype, device=ref.device)
            units[part, torch.arange(len(part), device=ref.device)] = 1
            columns.append((op @ units)[index])
        return self.factor * torch.cat(columns, dim=1)

    def kron(self, data: Any) -> Kron:
        """The Kronecker factors, one entry per parameter (exact blocks where none exist)."""
        if self.kind == "hessian":
            raise ValueError(
                "the Hessian has no Kronecker factors: use hessian_structure='diag' or 'full' "
                "with the Hessian, or the GGN/EF backend with 'kron'"
            )
        fisher = "empirical" if self.kind == "ef" else "mc" if self.mc_samples else "exact"
        op = curvkit.KFACOperator(
            self.model,
            self.loss_fn,
            data,
            params=list(self.params),
            fisher_type=fisher,
            mc_samples=max(self.mc_samples, 1),
            kfac_approx=self.kfac_approx,
            fallback="block",
            generator=self.generator,
            progress=self.progress,
        )
        entries: list[list[Tensor] | None] = [None] * len(self.params)
        for block in op.factors.values():
            _place_layer(block, entries, self.params)
        for block in op.fallback_blocks.values():
            entries[block.position] = [block.matrix]
        kron = Kron([entry for entry in entries if entry is not None])
        if len(kron) != len(self.params):
            raise RuntimeError("KFAC did not cover every parameter; this is a bug in curvkit")
        return kron * self.factor

    def eig_lowrank(self, data: Any, rank: int) -> tuple[Tensor, Tensor]:
        """The top ``rank`` eigenpairs ``(vectors [P, k], values [k])``, values above ``1e-6``.

        Raises:
            ValueError: For a curvature other than the GGN.
        """
        if self.kind != "ggn":
            raise ValueError("hessian_structure='lowrank' uses the GGN's eigenpairs")
        ((values, vectors),) = curvkit.ggn_eigh(
            self.model,
            self.loss_fn,
            data,
            [{"params": list(self.params), "criterion": curvkit.top_k(rank)}],
            mc_samples=self.mc_samples,
            generator=self.generator,
            max_memory=self.max_memory,
        )
        flat = torch.cat([v.reshape(v.shape[0], -1) for v in vectors], dim=1).T
        values = self.factor * values
        keep = values > 1e-6
        return flat[:, keep], values[keep]


def _place_layer(block: Any, entries: list[list[Tensor] | None], params: Sequence[Tensor]) -> None:
    """Put one layer's factors into laplace-torch's entries: ``[B, A]`` and ``[B]``."""
    if block.joint or block.B.ndim != 2 or (block.A is not None and block.A.ndim != 2):
        raise ValueError(
            f"layer {block.module!r}: grouped convolutions and joint weight-and-bias blocks "
            "have no laplace-torch Kronecker layout; use hessian_structure='diag' or 'full'"
        )
    if "weight" in block.params:
        position = block.params["weight"]
        if block.B.numel() == 1 and block.A.numel() == 1:
            entries[position] = [block.B * block.A]
        else:
            entries[position] = [block.B, block.A]
    if "bias" in block.params:
        entries[block.params["bias"]] = [block.B]
