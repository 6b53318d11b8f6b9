r"""KFAC and EKFAC as linear operators: :class:`KFACOperator`, :class:`EKFACOperator`.

Both act on the flat concatenation of the parameters like :class:`curvkit.GGNOperator`, with
one block per layer (:mod:`curvkit.quantities.kfac`): :math:`B \otimes A` for KFAC, and for EKFAC
the same eigenvectors :math:`Q_B \otimes Q_A` with eigenvalues re-fitted to the curvature's exact
diagonal in that basis. Since every block is diagonal in a Kronecker eigenbasis, the trace,
log-determinant, Frobenius norm and the damped inverse
:math:`(F + \delta I)^{-1} = (Q_B \otimes Q_A) (\Lambda + \delta)^{-1} (Q_B \otimes Q_A)^\top`
cost a few small eigendecompositions, never a :math:`D \times D` matrix.

The conventions (scaling with the reduction, weight and bias separate by default,
``kfac_approx``) are those of curvlinops' ``KFACLinearOperator`` and ``EKFACLinearOperator``,
so that ``op.to_dense()`` is the same matrix (:doc:`/migrating`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.core.data import Data
from curvkit.core.validation import check_damping
from curvkit.losses import LossFunction
from curvkit.operators.base import CurvatureOperator, DataOperator
from curvkit.ops.linalg import lapack_dtype
from curvkit.quantities.context import Params, Problem, fill_argument_docs
from curvkit.quantities.kfac import (
    FALLBACKS,
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    Fallback,
    FallbackBlock,
    FisherType,
    KFACApprox,
    KroneckerBlock,
    check_coverage,
    compute_kfac_blocks,
    eigenvalue_corrections,
    grouped,
    plan_layers,
)

__all__ = ["EKFACOperator", "KFACInverseOperator", "KFACOperator"]

#: Multiplies a layer's parts (:func:`_layer_parts`) by its block.
LayerApply = Callable[[dict[str, Tensor]], dict[str, Tensor]]
#: Multiplies one parameter's rows ``[D_p, J]`` by its fallback block.
PieceApply = Callable[[Tensor], Tensor]

#: ``inverse(method=...)`` values that invert through the Kronecker eigendecompositions.
EIGEN_METHODS = (None, "eigen", "exact")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _without_rounding(values: Tensor) -> Tensor:
    r"""Eigenvalues of a positive semi-definite matrix with those at rounding level set to zero.

    An eigenvalue within :math:`m \epsilon \lambda_{\max}` of zero (:math:`m` entries per group)
    cannot be told from zero by the arithmetic that computed it: cross-entropy's output factor
    always has a null vector, computed as about :math:`\pm 10^{-17}`. Zero makes the singular
    operator's log-determinant :math:`-\infty` and lets :meth:`KFACOperator.inverse` refuse it.
    """
    if values.numel() == 0:
        return values
    flat = values.reshape(values.shape[0], -1) if values.dim() > 1 else values.reshape(1, -1)
    largest = flat.abs().amax(-1, keepdim=True)
    tolerance = flat.shape[-1] * torch.finfo(values.dtype).eps * largest
    return torch.where(flat.abs() <= tolerance, 0, flat).reshape(values.shape)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """The eigenpairs of symmetric factors ``[..., m, m]``, rounding-level eigenvalues zero.

    Computed in a dtype LAPACK has (half precision in float32), returned in ``matrix``'s.
    """
    values, vectors = torch.linalg.eigh(matrix.to(lapack_dtype(matrix.dtype)))
    return _without_rounding(values).to(matrix.dtype), vectors.to(matrix.dtype)


def _inv(matrix: Tensor) -> Tensor:
    """The inverse of ``matrix`` ``[m, m]``, computed in a dtype LAPACK has."""
    return torch.linalg.inv(matrix.to(lapack_dtype(matrix.dtype))).to(matrix.dtype)


class _Spectrum:
    r"""One layer's eigenbasis and eigenvalues, :math:`(Q_B \otimes Q_A)\, \Lambda\, (\cdot)^\top`.

    ``values`` maps ``"weight"`` (``[G, O, I]``), ``"bias"`` (``[G, O]``) or ``"joint"``
    (``[G, O, I + 1]``) to the eigenvalues of that part.
    """

    def __init__(
        self, block: KroneckerBlock, qa: Tensor | None, qb: Tensor, values: dict[str, Tensor]
    ) -> None:
        self.block, self.qa, self.qb, self.values = block, qa, qb, values

    def with_values(self, values: dict[str, Tensor]) -> _Spectrum:
        return _Spectrum(self.block, self.qa, self.qb, values)

    def apply(self, parts: dict[str, Tensor]) -> dict[str, Tensor]:
        """Multiply the layer's parts ``[G, O, I, J]`` / ``[G, O, J]`` in the eigenbasis."""
        out = {}
        for key, matrix in parts.items():
            rotated = torch.einsum("gpo,gp...j->go...j", self.qb, matrix)
            if matrix.dim() == 4:
                rotated = torch.einsum("goij,gik->gokj", rotated, self.qa)
            rotated = rotated * self.values[key].unsqueeze(-1)
            if matrix.dim() == 4:
                rotated = torch.einsum("gokj,gik->goij", rotated, self.qa)
            out[key] = torch.einsum("gpo,go...j->gp...j", self.qb, rotated)
        return out


def _layer_parts(block: KroneckerBlock, pieces: list[Tensor]) -> dict[str, Tensor]:
    """The operand's parts of one layer: ``weight`` ``[G, O, I, J]``, ``bias`` ``[G, O, J]``."""
    b = grouped(block.B)
    groups, outputs = b.shape[0], b.shape[1]
    parts = {}
    for name, position in block.params.items():
        piece = pieces[position]
        if name == "weight":
            parts[name] = piece.reshape(groups, outputs, -1, piece.shape[-1])
        else:
            parts[name] = piece.reshape(groups, outputs, piece.shape[-1])
    if block.joint:
        bias = parts.pop("bias")
        parts = {"joint": torch.cat([parts.pop("weight"), bias.unsqueeze(2)], dim=2)}
    return parts


def _scatter(block: KroneckerBlock, parts: dict[str, Tensor], out: list[Tensor | None]) -> None:
    if block.joint:
        joint = parts["joint"]
        parts = {"weight": joint[:, :, :-1], "bias": joint[:, :, -1]}
    for name, position in block.params.items():
        out[position] = parts[name].reshape(-1, parts[name].shape[-1])


@fill_argument_docs
class KFACOperator(DataOperator):
    r"""KFAC: the Fisher/GGN approximated by one Kronecker product per layer.

    For every Linear and convolution layer (and any layer whose registered rule gives a
    :class:`~curvkit.engines.KroneckerFactor`) the block of its weight is :math:`B \otimes A`
    (row-major ``[out, in]`` layout), its bias's block is :math:`B` (:mod:`curvkit.quantities.kfac`
    defines :math:`A` and :math:`B`); parameters in other layers get the ``fallback``. The
    factors are computed on first use (a product, :attr:`factors`, :meth:`state_dict`) at the
    parameters' values then, in one pass over the data; build a new operator after changing them.

    ``op @ v``, ``op @ M`` and ``op @ [...]`` multiply as :class:`curvkit.GGNOperator` does;
    :meth:`trace`, :meth:`logdet`, :meth:`det`, :meth:`frobenius_norm` and :meth:`inverse` use the
    Kronecker structure.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        fisher_type: ``"exact"`` (columns of the loss Hessian's square root: KFAC of the GGN,
            curvlinops' ``"type-2"``), ``"mc"`` (``mc_samples`` targets sampled from the model's
            predictive distribution), ``"empirical"`` (the loss gradients at the observed
            targets) or ``"forward-only"`` (:math:`B = I`).
        mc_samples: Monte-Carlo samples per data point for ``fisher_type="mc"``; must be 1
            otherwise.
        kfac_approx: ``"expand"`` (positions of a sequence or an image count as samples) or
            ``"reduce"`` (positions are averaged in :math:`A` and summed in :math:`B`),
            Eschenhagen et al. (2023); the same for layers without weight sharing.
        separate_weight_and_bias: ``True``: a layer's weight and bias get separate blocks;
            ``False``: one block :math:`B \otimes A` with the input extended by a constant 1.
        fallback: Parameters without a Kronecker factor: ``"error"`` refuses them with their
            name, ``"diagonal"`` and ``"block"`` cover them with the exact diagonal or block of
            the same curvature (``fisher_type``).
        generator: Random number generator whose current state seeds the Monte-Carlo samples; a
            seed is drawn from the global generator if ``None``.
        progress: {progress}

    Raises:
        TypeError, ValueError: For an unknown ``fisher_type``, ``kfac_approx`` or ``fallback``,
            ``mc_samples`` other than 1 without ``fisher_type="mc"``, parameters of different
            dtypes or devices, and the errors of :class:`curvkit.quantities.context.Problem`; a
            parameter without a Kronecker factor under ``fallback="error"`` (or
            ``"forward-only"``): at construction when its module has no rule, on first use when a
            rule declines.
    """

    name = "KFACOperator"
    fisher_types: tuple[str, ...] = FISHER_TYPES

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFunction,
        data: Data,
        *,
        params: Params = None,
        fisher_type: FisherType = "exact",
        mc_samples: int = 1,
        kfac_approx: KFACApprox = "expand",
        separate_weight_and_bias: bool = True,
        fallback: Fallback = "error",
        generator: torch.Generator | None = None,
        progress: bool | None = None,
    ) -> None:
        _check_choice(fisher_type, "fisher_type", self.fisher_types)
        _check_choice(kfac_approx, "kfac_approx", KFAC_APPROXIMATIONS)
        _check_choice(fallback, "fallback", FALLBACKS)
        if not isinstance(separate_weight_and_bias, bool):
            raise TypeError(
                f"separate_weight_and_bias must be a bool, got {separate_weight_and_bias!r}"
            )
        if fisher_type != "mc" and mc_samples != 1:
            raise ValueError(
                f"mc_samples={mc_samples!r} applies to fisher_type='mc' only; with "
                f"fisher_type={fisher_type!r} leave it at 1"
            )
        problem = Problem(
            model,
            loss_fn,
            data,
            params,
            mc_samples=mc_samples if fisher_type == "mc" else 0,
            generator=generator,
            progress=progress,
            name=self.name,
        )
        if fisher_type == "mc" and problem.mc_samples == 0:
            raise ValueError("fisher_type='mc' needs mc_samples >= 1 (samples per data point)")
        # The engine's parameters are the user's: a bias alone gets its output factor from its
        # own factor (plan_layers).
        self._plans, _ = plan_layers(model, problem.params)
        check_coverage(model, self._plans, fallback=fallback, fisher_type=fisher_type)
        self._set_problem(problem, generator=generator)
        self.fisher_type = fisher_type
        self.mc_samples = mc_samples
        self.kfac_approx = kfac_approx
        self.separate_weight_and_bias = separate_weight_and_bias
        self.fallback = fallback
        self._blocks: list[KroneckerBlock] | None = None
        self._fallback_blocks: list[FallbackBlock] = []
        self._spectra: list[_Spectrum] | None = None

    def __repr__(self) -> str:
        return (
            f"{self.name}(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
            f"fisher_type={self.fisher_type!r}, kfac_approx={self.kfac_approx!r})"
        )

    # -- computing the factors ---------------------------------------------------------------

    def _compute(self) -> None:
        self._replay_generator()
        self._blocks, self._fallback_blocks = compute_kfac_blocks(
            self._problem,
            self._plans,
            fisher_type=self.fisher_type,
            kfac_approx=self.kfac_approx,
            separate_weight_and_bias=self.separate_weight_and_bias,
            fallback=self.fallback,
        )
        self._spectra = None

    def _kronecker_blocks(self) -> list[KroneckerBlock]:
        if self._blocks is None:
            self._compute()
        assert self._blocks is not None
        return self._blocks

    @property
    def factors(self) -> dict[str, KroneckerBlock]:
        """The Kronecker factors ``A`` and ``B`` per layer (by module name), computed if needed."""
        return {block.module: block for block in self._kronecker_blocks()}

    @property
    def fallback_blocks(self) -> dict[str, FallbackBlock]:
        """The exact diagonals or blocks of the parameters without Kronecker factors, by name."""
        self._kronecker_blocks()
        return {block.name: block for block in self._fallback_blocks}

    # -- spectra ------------------------------------------------------------------------------

    def _kronecker_spectra(self) -> list[_Spectrum]:
        """The eigendecomposition of every layer's factors, with KFAC's eigenvalues."""
        if self._spectra is None:
            spectra = []
            for block in self._kronecker_blocks():
                lb, qb = _eigh(grouped(block.B))
                la, qa = (None, None) if block.A is None else _eigh(grouped(block.A))
                values = {}
                if block.joint:
                    values["joint"] = lb.unsqueeze(-1) * la.unsqueeze(-2)
                else:
                    if "weight" in block.params:
                        values["weight"] = lb.unsqueeze(-1) * la.unsqueeze(-2)
                    if "bias" in block.params:
                        values["bias"] = lb
                spectra.append(_Spectrum(block, qa, qb, values))
            self._spectra = spectra
        return self._spectra

    def _fallback_eigenvalues(self) -> list[Tensor]:
        return [
            _without_rounding(block.matrix) if block.kind == "diagonal" else _eigh(block.matrix)[0]
            for block in self._fallback_blocks
        ]

    def _eigenvalues(self) -> list[Tensor]:
        """Every eigenvalue of the operator, as a list of tensors."""
        values = [v for s in self._spectra_for_values() for v in s.values.values()]
        return values + self._fallback_eigenvalues()

    def _spectra_for_values(self) -> list[_Spectrum]:
        return self._kronecker_spectra()

    # -- products -------------------------------------------------------------------------------

    def _split(self, matrix: Tensor) -> list[Tensor]:
        sizes = [shape.numel() for shape in self.param_shapes]
        return list(matrix.split(sizes))

    def _apply_blocks(
        self,
        matrix: Tensor,
        layers: list[tuple[KroneckerBlock, LayerApply]],
        fallback: list[tuple[FallbackBlock, PieceApply]],
    ) -> Tensor:
        """Multiply ``matrix`` ``[D, J]`` block by block."""
        pieces = self._split(matrix)
        out: list[Tensor | None] = [None] * len(pieces)
        for block, apply in layers:
            _scatter(block, apply(_layer_parts(block, pieces)), out)
        for block, apply in fallback:
            out[block.position] = apply(pieces[block.position])
        return torch.cat(out)  # type: ignore[arg-type]

    @staticmethod
    def _layer_product(block: KroneckerBlock) -> LayerApply:
        a = None if block.A is None else grouped(block.A)
        b = grouped(block.B)

        def apply(parts: dict[str, Tensor]) -> dict[str, Tensor]:
            out = {}
            for key, m in parts.items():
                m = torch.einsum("gop,gp...j->go...j", b, m)
                out[key] = torch.einsum("goij,gik->gokj", m, a) if m.dim() == 4 else m
            return out

        return apply

    @staticmethod
    def _fallback_product(block: FallbackBlock) -> PieceApply:
        matrix = block.matrix

        def apply(piece: Tensor) -> Tensor:
            if block.kind == "diagonal":
                return matrix.unsqueeze(-1) * piece
            return matrix @ piece

        return apply

    def _matmat(self, matrix: Tensor) -> Tensor:
        blocks = self._kronecker_blocks()
        layers = [(block, self._layer_product(block)) for block in blocks]
        fallback = [(block, self._fallback_product(block)) for block in self._fallback_blocks]
        return self._apply_blocks(matrix, layers, fallback)

    # -- scalars ------------------------------------------------------------------------------

    def trace(self) -> Tensor:
        r"""Return :math:`\operatorname{tr} F = \sum \operatorname{tr} A \operatorname{tr} B`."""
        total = self._zero()
        for block in self._kronecker_blocks():
            tr_b = grouped(block.B).diagonal(dim1=-2, dim2=-1).sum(-1)
            if block.A is not None:
                tr_a = grouped(block.A).diagonal(dim1=-2, dim2=-1).sum(-1)
                total = total + (tr_a * tr_b).sum()
            if "bias" in block.params and not block.joint:
                total = total + tr_b.sum()
        for block in self._fallback_blocks:
            total = total + (
                block.matrix.sum() if block.kind == "diagonal" else block.matrix.trace()
            )
        return total

    def frobenius_norm(self) -> Tensor:
        r"""Return :math:`\|F\|_F`, with :math:`\|A \otimes B\|_F = \|A\|_F \|B\|_F`."""
        total = self._zero()
        for block in self._kronecker_blocks():
            sq_b = grouped(block.B).square().sum(dim=(-2, -1))
            if block.A is not None:
                total = total + (grouped(block.A).square().sum(dim=(-2, -1)) * sq_b).sum()
            if "bias" in block.params and not block.joint:
                total = total + sq_b.sum()
        for block in self._fallback_blocks:
            total = total + block.matrix.square().sum()
        return total.sqrt()

    def logdet(self, damping: float = 0.0) -> Tensor:
        r"""Return :math:`\log \det (F + \delta I)` from the eigenvalues of the blocks.

        Args:
            damping: :math:`\delta \ge 0`.

        Returns:
            The log-determinant, ``-inf`` for a singular matrix (eigenvalues within rounding of
            zero count as zero).
        """
        damping = check_damping(damping)
        return sum((v + damping).log().sum() for v in self._eigenvalues()) + self._zero()

    def det(self, damping: float = 0.0) -> Tensor:
        r"""Return :math:`\det (F + \delta I) = \exp \log \det (F + \delta I)` (may overflow).

        Args:
            damping: :math:`\delta \ge 0`.
        """
        return self.logdet(damping).exp()

    def _zero(self) -> Tensor:
        return torch.zeros((), dtype=self.dtype, device=self.device)

    # -- inverse ------------------------------------------------------------------------------

    def inverse(
        self,
        damping: float = 0.0,
        *,
        method: str | None = None,
        heuristic_damping: bool = False,
        min_damping: float = 1e-8,
        **options: Any,
    ) -> CurvatureOperator:
        r"""The damped inverse :math:`(F + \delta I)^{-1}` as an operator.

        With ``method`` ``None``, ``"eigen"`` or ``"exact"``, it is applied through the
        factors' eigendecompositions: :math:`(Q_B \otimes Q_A)(\Lambda + \delta)^{-1}
        (Q_B \otimes Q_A)^\top` per layer (curvlinops' ``KFACInverseLinearOperator`` with
        ``use_exact_damping=True``). With ``heuristic_damping=True``, KFAC's weights instead
        get :math:`(A + \pi \sqrt\delta I)^{-1} \otimes (B + \sqrt\delta / \pi I)^{-1}`,
        :math:`\pi = \sqrt{(\operatorname{tr} A / \dim A) / (\operatorname{tr} B / \dim B)}`,
        each damping at least ``min_damping`` (Martens & Grosse, 2015; curvlinops'
        ``use_heuristic_damping=True``); biases and fallbacks keep :math:`\delta`. Any other
        ``method`` goes to :meth:`CurvatureOperator.inverse` with ``options``.

        Args:
            damping: :math:`\delta \ge 0`.
            method: ``None``, ``"eigen"`` or ``"exact"`` for the Kronecker inverse.
            heuristic_damping: Use the factor-wise heuristic damping (KFAC only).
            min_damping: Lower bound of the heuristic's factor dampings.
            **options: Passed to the base class for other methods.

        Returns:
            The inverse operator.

        Raises:
            ValueError: For a negative damping, heuristic damping of EKFAC, or zero damping of a
                singular operator (cross-entropy's output factor always has a null vector).
            TypeError: For ``options`` with the Kronecker inverse.
        """
        if method not in EIGEN_METHODS:
            return super().inverse(damping, method=method, **options)  # type: ignore[misc]
        if options:
            raise TypeError(f"unexpected options for the Kronecker inverse: {sorted(options)}")
        damping = check_damping(damping)
        spectra = self._spectra_for_values()
        if damping == 0 and not heuristic_damping:
            self._refuse_singular()
        if heuristic_damping:
            spectra = [_heuristic(s, damping, min_damping) for s in self._heuristic_spectra()]
        else:
            spectra = [
                s.with_values({k: 1.0 / (v + damping) for k, v in s.values.items()})
                for s in spectra
            ]
        fallback = []
        for block in self._fallback_blocks:
            if block.kind == "diagonal":
                inverse = FallbackBlock(
                    block.name, block.position, "diagonal", 1 / (block.matrix + damping)
                )
            else:
                eye = torch.eye(block.matrix.shape[0], dtype=self.dtype, device=self.device)
                inverse = FallbackBlock(
                    block.name,
                    block.position,
                    "block",
                    _inv(block.matrix + damping * eye),
                )
            fallback.append(inverse)
        return KFACInverseOperator(self, spectra, fallback)

    def _heuristic_spectra(self) -> list[_Spectrum]:
        return self._kronecker_spectra()

    def _refuse_singular(self) -> None:
        """Refuse the undamped inverse of a singular operator: it would return about 1/eps."""
        zeros = sum(int((v == 0).sum()) for v in self._eigenvalues())
        if zeros:
            raise ValueError(
                f"{self.name} is singular ({zeros} of its {self.shape[0]} eigenvalues are zero to "
                "rounding; cross-entropy's output factor always has a null vector), so its "
                "inverse needs a damping: pass damping > 0, e.g. 1e-3 * op.trace() / op.shape[0]"
            )

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The settings and factors (computed if needed), to restore with :meth:`load_state_dict`.

        Unlike curvlinops, the model's parameters are not part of the state.
        """
        return {
            "fisher_type": self.fisher_type,
            "mc_samples": self.mc_samples,
            "kfac_approx": self.kfac_approx,
            "separate_weight_and_bias": self.separate_weight_and_bias,
            "fallback": self.fallback,
            "factors": {
                block.module: {
                    "params": dict(block.params),
                    "A": block.A,
                    "B": block.B,
                    "joint": block.joint,
                }
                for block in self._kronecker_blocks()
            },
            "fallback_blocks": {
                block.name: {"position": block.position, "kind": block.kind, "matrix": block.matrix}
                for block in self._fallback_blocks
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Use the factors of :meth:`state_dict` instead of computing them.

        The whole state is checked before anything of this operator changes. Tensors are moved
        to the operator's device; their dtype must be the operator's.

        Args:
            state_dict: From :meth:`state_dict` of an operator with the same settings, on a
                model of the same architecture and the same parameters.

        Raises:
            ValueError: If the settings, the layers' or parameters' names, the factor shapes or
                the dtype differ from this operator's, or an entry is missing.
        """
        blocks, fallback = self._read_state(state_dict)
        self._blocks, self._fallback_blocks, self._spectra = blocks, fallback, None

    def _read_state(
        self, state_dict: Mapping[str, Any]
    ) -> tuple[list[KroneckerBlock], list[FallbackBlock]]:
        """The checked blocks of a state, on the operator's device."""
        _require(state_dict, ("factors", "fallback_blocks"), self.name)
        for key in (
            "fisher_type",
            "mc_samples",
            "kfac_approx",
            "separate_weight_and_bias",
            "fallback",
        ):
            if state_dict.get(key) != getattr(self, key):
                raise ValueError(
                    f"the state has {key}={state_dict.get(key)!r}, this operator "
                    f"{getattr(self, key)!r}"
                )
        blocks = [
            KroneckerBlock(
                name,
                dict(f["params"]),
                self._state_tensor(f["A"]),
                self._state_tensor(f["B"]),
                f["joint"],
            )
            for name, f in state_dict["factors"].items()
        ]
        fallback = [
            FallbackBlock(name, f["position"], f["kind"], self._state_tensor(f["matrix"]))
            for name, f in state_dict["fallback_blocks"].items()
        ]
        self._check_state(blocks, fallback)
        return blocks, fallback

    def _state_tensor(self, tensor: Tensor | None) -> Tensor | None:
        """A state's tensor on the operator's device, refused in another dtype."""
        if tensor is None:
            return None
        if tensor.dtype != self.dtype:
            raise ValueError(
                f"the state's factors have dtype {tensor.dtype}, this operator {self.dtype}: "
                "load a state saved from an operator of the same dtype (or build this operator "
                f"on a model in {tensor.dtype})"
            )
        return tensor.to(self.device)

    def _check_state(self, blocks: list[KroneckerBlock], fallback: list[FallbackBlock]) -> None:
        covered = sorted(
            [p for b in blocks for p in b.params.values()] + [b.position for b in fallback]
        )
        if covered != list(range(len(self.param_shapes))):
            raise ValueError(
                f"the state covers parameters {covered}, this operator has "
                f"{len(self.param_shapes)}: was it made for other params?"
            )
        names = self._param_names()
        for block in blocks:
            for name, position in block.params.items():
                if f"{block.module}.{name}".lstrip(".") != names[position]:
                    raise ValueError(
                        f"the state's factors of {block.module!r} cover its {name}, but this "
                        f"operator's parameter {position} is {names[position]!r}: the state was "
                        "made for another model or other params"
                    )
        for block in fallback:
            if block.name != names[block.position]:
                raise ValueError(
                    f"the state's fallback block {block.name!r} is for parameter "
                    f"{block.position}, which is {names[block.position]!r} here: the state was "
                    "made for another model or other params"
                )
        for block in blocks:
            self._check_block_shapes(block)

    def _param_names(self) -> list[str]:
        """The qualified names of the operator's parameters, in order."""
        names = {id(p): name for name, p in self._problem.model.named_parameters()}
        return [names[id(p)] for p in self._problem.params]

    def _check_block_shapes(self, block: KroneckerBlock) -> None:
        b = grouped(block.B)
        for name, position in block.params.items():
            size = self.param_shapes[position].numel()
            expected = (
                b.shape[0]
                * b.shape[1]
                * (1 if name == "bias" else grouped(block.A).shape[-1] - block.joint)
            )
            if size != expected:
                raise ValueError(
                    f"the factors of {block.module!r} do not fit its {name} of "
                    f"shape {tuple(self.param_shapes[position])}"
                )


def _require(state_dict: Mapping[str, Any], keys: tuple[str, ...], name: str) -> None:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(
            f"the state lacks {', '.join(map(repr, missing))}: pass the state_dict() of a "
            f"{name} with the same settings"
        )


def _heuristic(spectrum: _Spectrum, damping: float, min_damping: float) -> _Spectrum:
    r"""Inverse eigenvalues with :math:`\pi`-damping of the two factors (weights only)."""
    block = spectrum.block
    values = {}
    lb = _eigh(grouped(block.B))[0]
    if "bias" in spectrum.values:
        values["bias"] = 1.0 / (lb + damping)
    if block.A is not None:
        la = _eigh(grouped(block.A))[0]
        mean_a = grouped(block.A).diagonal(dim1=-2, dim2=-1).mean(-1)
        mean_b = grouped(block.B).diagonal(dim1=-2, dim2=-1).mean(-1)
        pi = (mean_a / mean_b).sqrt()
        root = math.sqrt(damping)
        damp_a = (pi * root).clamp(min=min_damping)
        damp_b = (root / pi).clamp(min=min_damping)
        key = "joint" if block.joint else "weight"
        values[key] = 1.0 / (
            (lb + damp_b.unsqueeze(-1)).unsqueeze(-1) * (la + damp_a.unsqueeze(-1)).unsqueeze(-2)
        )
    return spectrum.with_values(values)


class KFACInverseOperator(CurvatureOperator):
    r"""The damped inverse of a :class:`KFACOperator` or :class:`EKFACOperator`, per layer.

    Made by :meth:`KFACOperator.inverse`; each layer's block is applied in its Kronecker
    eigenbasis, each fallback block as its inverse.
    """

    def __init__(
        self, operator: KFACOperator, spectra: list[_Spectrum], fallback: list[FallbackBlock]
    ) -> None:
        self._operator = operator
        self._spectra = spectra
        self._fallback = fallback
        self.shape = operator.shape
        self.dtype = operator.dtype
        self.device = operator.device
        self.param_shapes = operator.param_shapes

    def _matmat(self, matrix: Tensor) -> Tensor:
        layers = [(s.block, s.apply) for s in self._spectra]
        fallback = [(b, KFACOperator._fallback_product(b)) for b in self._fallback]
        return self._operator._apply_blocks(matrix, layers, fallback)


@fill_argument_docs
class EKFACOperator(KFACOperator):
    r"""EKFAC: KFAC's Kronecker eigenbasis with eigenvalues re-fitted to the curvature.

    For each layer, :math:`Q_A` and :math:`Q_B` are the eigenvectors of KFAC's factors and the
    eigenvalues are the second moments of the per-sample gradients in that basis
    (:func:`curvkit.quantities.kfac.eigenvalue_corrections`): the exact diagonal of the
    (``fisher_type``) curvature's layer block in the basis :math:`Q_B \otimes Q_A` (George et al.,
    2018). It takes a second pass over the data. Fallback parameters are as for KFAC.

    Args:
        model: {model}
        loss_fn: {loss_fn}
        data: {data}
        params: {params}
        fisher_type: ``"exact"``, ``"mc"`` or ``"empirical"``, as for :class:`KFACOperator`.
        mc_samples: As for :class:`KFACOperator`; both passes see the same samples.
        kfac_approx: The factors whose eigenvectors are used, as for :class:`KFACOperator`.
        separate_weight_and_bias: As for :class:`KFACOperator`.
        fallback: As for :class:`KFACOperator`.
        generator: As for :class:`KFACOperator`.
        progress: {progress}

    Raises:
        TypeError, ValueError: As :class:`KFACOperator` (``"forward-only"`` is refused).
    """

    name = "EKFACOperator"
    fisher_types = ("exact", "mc", "empirical")

    def _compute(self) -> None:
        super()._compute()
        blocks = self._kronecker_blocks()
        bases = []
        for block in blocks:
            qb = _eigh(grouped(block.B))[1]
            qa = None if block.A is None else _eigh(grouped(block.A))[1]
            bases.append((qa, qb))
        self._replay_generator()
        weights = {plan.module: plan.weight for plan in self._plans}
        corrections = eigenvalue_corrections(
            self._problem,
            blocks,
            [weights[block.module] for block in blocks],
            bases,
            fisher_type=self.fisher_type,
        )
        self._corrected = [
            _Spectrum(block, qa, qb, {k: _without_rounding(v) for k, v in values.items()})
            for block, (qa, qb), values in zip(blocks, bases, corrections, strict=True)
        ]

    def _spectra_for_values(self) -> list[_Spectrum]:
        self._kronecker_blocks()
        return self._corrected

    @property
    def eigenvectors(self) -> dict[str, tuple[Tensor | None, Tensor]]:
        """Per layer, :math:`(Q_A, Q_B)`, each ``[G, m, m]`` (``Q_A`` ``None`` for a lone bias)."""
        return {s.block.module: (s.qa, s.qb) for s in self._spectra_for_values()}

    @property
    def eigenvalues(self) -> dict[str, dict[str, Tensor]]:
        r"""Per layer, the corrected eigenvalues of ``"weight"``/``"bias"`` or ``"joint"``.

        A weight's are ``[G, O, I]``: entry ``[g, o, i]`` belongs to the eigenvector
        :math:`Q_B[g][:, o] \otimes Q_A[g][:, i]`; a bias's are ``[G, O]``.
        """
        return {s.block.module: dict(s.values) for s in self._spectra_for_values()}

    def _matmat(self, matrix: Tensor) -> Tensor:
        layers = [(s.block, s.apply) for s in self._spectra_for_values()]
        fallback = [(b, self._fallback_product(b)) for b in self._fallback_blocks]
        return self._apply_blocks(matrix, layers, fallback)

    def trace(self) -> Tensor:  # noqa: D102
        return sum(v.sum() for v in self._eigenvalues()) + self._zero()

    def frobenius_norm(self) -> Tensor:  # noqa: D102
        return (sum(v.square().sum() for v in self._eigenvalues()) + self._zero()).sqrt()

    def _heuristic_spectra(self) -> list[_Spectrum]:
        raise ValueError("EKFAC's inverse has no heuristic damping: use heuristic_damping=False")

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        state = super().state_dict()
        state["eigenvectors"] = {s.block.module: (s.qa, s.qb) for s in self._corrected}
        state["corrections"] = {s.block.module: dict(s.values) for s in self._corrected}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # noqa: D102
        blocks, fallback = self._read_state(state_dict)
        _require(state_dict, ("eigenvectors", "corrections"), self.name)
        missing = [
            block.module
            for block in blocks
            if block.module not in state_dict["eigenvectors"]
            or block.module not in state_dict["corrections"]
        ]
        if missing:
            raise ValueError(
                f"the state has no eigenbasis or corrections for {missing}: pass the "
                "state_dict() of an EKFACOperator with the same settings"
            )
        corrected = [
            _Spectrum(
                block,
                *(self._state_tensor(q) for q in state_dict["eigenvectors"][block.module]),
                {
                    k: self._state_tensor(v)
                    for k, v in state_dict["corrections"][block.module].items()
                },
            )
            for block in blocks
        ]
        self._blocks, self._fallback_blocks, self._spectra = blocks, fallback, None
        self._corrected = corrected
