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
from curvkit.losses import LossFunction
from curvkit.operators.base import CurvatureOperator
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
    plan_layers,
)

__all__ = ["EKFACOperator", "KFACInverseOperator", "KFACOperator"]

#: Multiplies a layer's parts (:func:`_layer_parts`) by its block.
LayerApply = Callable[[dict[str, Tensor]], dict[str, Tensor]]
#: Multiplies one parameter's rows ``[D_p, J]`` by its fallback block.
PieceApply = Callable[[Tensor], Tensor]

#: ``inverse(method=...)`` values that invert through the Kronecker eigendecompositions.
EIGEN_METHODS = (None, "eigen", "exact")


def _grouped(tensor: Tensor) -> Tensor:
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


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
    b = _grouped(block.B)
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
class KFACOperator(CurvatureOperator):
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
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if fisher_type != "mc" and mc_samples != 1:
            raise ValueError(
                f"mc_samples={mc_samples} applies to fisher_type='mc' only; with "
                f"fisher_type={fisher_type!r} leave it at 1"
            )
        user = Problem(model, loss_fn, data, params, progress=progress, name=self.name)
        self._set_domain(user.params)
        self._plans, engine_params = plan_layers(model, user.params)
        check_coverage(model, self._plans, fallback=fallback, fisher_type=fisher_type)
        self._problem = Problem(
            model,
            loss_fn,
            data,
            engine_params,
            mc_samples=mc_samples if fisher_type == "mc" else 0,
            generator=generator,
            progress=progress,
            name=self.name,
        )
        if fisher_type == "mc":
            self._fix_random_state(generator)
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

    def _replay_generator(self) -> None:
        """Give the problem a generator in the state taken at construction (same samples)."""
        generator = self._replayed_generator()
        if generator is not None:
            self._problem.generator = generator

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
                lb, qb = torch.linalg.eigh(_grouped(block.B))
                la, qa = (None, None) if block.A is None else torch.linalg.eigh(_grouped(block.A))
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
            block.matrix if block.kind == "diagonal" else torch.linalg.eigvalsh(block.matrix)
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
        a = None if block.A is None else _grouped(block.A)
        b = _grouped(block.B)

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
            tr_b = _grouped(block.B).diagonal(dim1=-2, dim2=-1).sum(-1)
            if block.A is not None:
                tr_a = _grouped(block.A).diagonal(dim1=-2, dim2=-1).sum(-1)
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
            sq_b = _grouped(block.B).square().sum(dim=(-2, -1))
            if block.A is not None:
                total = total + (_grouped(block.A).square().sum(dim=(-2, -1)) * sq_b).sum()
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
            The log-determinant (``-inf`` for a singular matrix, ``nan`` if rounding made an
            eigenvalue negative without damping).
        """
        damping = _check_damping(damping)
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
            ValueError: For a negative damping, or heuristic damping of EKFAC.
            TypeError: For ``options`` with the Kronecker inverse.
        """
        if method not in EIGEN_METHODS:
            return super().inverse(damping, method=method, **options)  # type: ignore[misc]
        if options:
            raise TypeError(f"unexpected options for the Kronecker inverse: {sorted(options)}")
        damping = _check_damping(damping)
        spectra = self._spectra_for_values()
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
                    torch.linalg.inv(block.matrix + damping * eye),
                )
            fallback.append(inverse)
        return KFACInverseOperator(self, spectra, fallback)

    def _heuristic_spectra(self) -> list[_Spectrum]:
        return self._kronecker_spectra()

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

        Args:
            state_dict: From :meth:`state_dict` of an operator with the same settings, on a
                model of the same architecture and the same parameters.

        Raises:
            ValueError: If the settings, layers or factor shapes differ from this operator's.
        """
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
            KroneckerBlock(name, dict(f["params"]), f["A"], f["B"], f["joint"])
            for name, f in state_dict["factors"].items()
        ]
        fallback = [
            FallbackBlock(name, f["position"], f["kind"], f["matrix"])
            for name, f in state_dict["fallback_blocks"].items()
        ]
        self._check_state(blocks, fallback)
        self._blocks, self._fallback_blocks, self._spectra = blocks, fallback, None

    def _check_state(self, blocks: list[KroneckerBlock], fallback: list[FallbackBlock]) -> None:
        covered = sorted(
            [p for b in blocks for p in b.params.values()] + [b.position for b in fallback]
        )
        if covered != list(range(len(self.param_shapes))):
            raise ValueError(
                f"the state covers parameters {covered}, this operator has "
                f"{len(self.param_shapes)}: was it made for other params?"
            )
        for block in blocks:
            b = _grouped(block.B)
            for name, position in block.params.items():
                size = self.param_shapes[position].numel()
                expected = (
                    b.shape[0]
                    * b.shape[1]
                    * (1 if name == "bias" else _grouped(block.A).shape[-1] - block.joint)
                )
                if size != expected:
                    raise ValueError(
                        f"the factors of {block.module!r} do not fit its {name} of "
                        f"shape {tuple(self.param_shapes[position])}"
                    )


def _check_damping(damping: float) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"damping must be a non-negative number, got {damping!r}")
    return float(damping)


def _heuristic(spectrum: _Spectrum, damping: float, min_damping: float) -> _Spectrum:
    r"""Inverse eigenvalues with :math:`\pi`-damping of the two factors (weights only)."""
    block = spectrum.block
    values = {}
    lb = torch.linalg.eigvalsh(_grouped(block.B))
    if "bias" in spectrum.values:
        values["bias"] = 1.0 / (lb + damping)
    if block.A is not None:
        la = torch.linalg.eigvalsh(_grouped(block.A))
        mean_a = _grouped(block.A).diagonal(dim1=-2, dim2=-1).mean(-1)
        mean_b = _grouped(block.B).diagonal(dim1=-2, dim2=-1).mean(-1)
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
            qb = torch.linalg.eigh(_grouped(block.B)).eigenvectors
            qa = None if block.A is None else torch.linalg.eigh(_grouped(block.A)).eigenvectors
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
            _Spectrum(block, qa, qb, values)
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
        super().load_state_dict(state_dict)
        assert self._blocks is not None
        self._corrected = [
            _Spectrum(
                block,
                *state_dict["eigenvectors"][block.module],
                dict(state_dict["corrections"][block.module]),
            )
            for block in self._blocks
        ]
