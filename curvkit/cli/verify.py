r"""``curvkit verify``: every curvature quantity against plain autograd, on a model zoo.

For each model of :data:`MODELS` (cases of :mod:`curvkit.testing.zoo`) the dense references are
built once from :mod:`curvkit.testing.verify` (dense GGN, output Hessians) and from plain
``torch.autograd`` (per-sample gradients :math:`\nabla L_n`, Jacobian-vector products), and every
quantity of curvkit is compared with them; the batched Newton steps of :mod:`curvkit.ops.newton` are
compared with solves of per-item Hessians from double backward. Errors are relative to the
largest reference entry.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import curvkit
from curvkit import losses
from curvkit.cli._common import add_torch_options, apply_torch_options, format_table
from curvkit.ops.newton import newton_step
from curvkit.testing import verify
from curvkit.testing.zoo import Case, make_case

#: Tolerance per dtype, relative to the largest reference entry.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}
#: Eigenvector-based quantities lose accuracy with the eigengap: a looser factor in float32.
EIGEN_FACTOR = {torch.float64: 1.0, torch.float32: 10.0}
NUM_DIRECTIONS = 3
DAMPING = 0.5
#: The cases of :data:`curvkit.testing.zoo.CASES` that are checked, with their names in the table.
#: Whether the ViViT drop-in (the ``vivit`` extra) can be checked beside the functional API.
BACKPACK_INSTALLED = importlib.util.find_spec("backpack") is not None

MODELS = {
    "mlp": "MLP",
    "cnn": "CNN",
    "residual": "residual",
    "attention": "LayerNorm + attention",
    "embedding": "embedding",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``curvkit verify`` to its parser."""
    add_torch_options(parser, default_dtype="float64")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


@dataclass
class Result:
    """One row of the table."""

    model: str
    quantity: str
    max_rel_error: float
    passed: bool
    note: str = ""


def run(args: argparse.Namespace) -> int:
    """Run ``curvkit verify``: every check, then the table; the exit code is 1 if one failed."""
    device, dtype = apply_torch_options(args)
    tolerance = TOLERANCES[dtype]
    print(
        f"curvkit {curvkit.__version__} verify | torch {torch.__version__} | {device} "
        f"{args.dtype} | tolerance {tolerance:g} relative to the largest reference entry",
        flush=True,
    )
    if not BACKPACK_INSTALLED:
        print(
            "BackPACK is not installed, so the ViViT drop-in is not checked "
            '(pip install "curvkit[vivit]")'
        )
    start = time.perf_counter()
    results: list[Result] = []
    for name in MODELS:
        case = make_case(name, device=device, dtype=dtype, seed=args.seed)
        results.extend(check_case(case, tolerance, EIGEN_FACTOR[dtype] * tolerance))
    results.extend(check_newton_steps(device, dtype, tolerance, args.seed))
    print(
        format_table(
            ["model", "quantity", "max rel error", "result"],
            [
                [
                    r.model,
                    r.quantity,
                    "-" if r.note else f"{r.max_rel_error:.1e}",
                    ("pass" if r.passed else "FAIL") + (f" ({r.note})" if r.note else ""),
                ]
                for r in results
            ],
        )
    )
    failed = [r for r in results if not r.passed]
    print(
        f"{len(results) - len(failed)}/{len(results)} checks passed in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 1 if failed else 0


def check_case(case: Case, tolerance: float, eigen_tolerance: float) -> list[Result]:
    """Compare each quantity with its reference on one model.

    A quantity that raises is a failed check (the error is printed), never an aborted run.

    Args:
        case: The model, loss and batch; its name in the table is the one :data:`MODELS` gives.
        tolerance: Relative tolerance of the quantities linear in the GGN.
        eigen_tolerance: Relative tolerance of the eigenvector-based quantities.

    Returns:
        One result per quantity.
    """
    references = _References(case)
    checks: list[tuple[str, Callable[[], tuple[Tensor, Tensor]], float]] = [
        ("output Hessian square root", references.output_hessian, tolerance),
        ("GGN diagonal", references.diagonal, tolerance),
        ("GGN diagonal, 2 batches", references.diagonal_two_batches, tolerance),
        ("GGN-vector product", references.vector_product, tolerance),
        ("GGN columns", references.columns, tolerance),
        ("dense GGN", references.matrix, tolerance),
        ("GGNOperator @ matrix", references.operator, tolerance),
        (f"top-{NUM_DIRECTIONS} eigenvalues", references.eigenvalues, eigen_tolerance),
        (f"top-{NUM_DIRECTIONS} eigenvectors", references.eigenvectors, eigen_tolerance),
        ("directional gradients", references.gammas, eigen_tolerance),
        ("directional curvatures", references.lambdas, eigen_tolerance),
        ("damped Newton step", references.damped_newton_step, eigen_tolerance),
    ]
    if isinstance(case.loss_fn, nn.MSELoss):
        checks.insert(2, ("Gauss-Newton diagonal", references.gauss_newton_diagonal, tolerance))
    if case.backpack_compatible and BACKPACK_INSTALLED:
        checks.append(
            (
                "ViViT drop-in on BackPACK: step",
                references.vivit_damped_newton_step,
                eigen_tolerance,
            )
        )
    model = MODELS.get(case.name, case.name)
    return [_run_check(model, quantity, compute, tol) for quantity, compute, tol in checks]


def _run_check(
    model: str, quantity: str, compute: Callable[[], tuple[Tensor, Tensor]], tolerance: float
) -> Result:
    """Compare ``compute()``'s pair with a tolerance relative to the largest reference entry."""
    try:
        actual, expected = compute()
    except Exception as error:
        traceback.print_exc()
        return Result(model, quantity, float("nan"), False, type(error).__name__)
    atol = tolerance * expected.abs().max().item()
    [row] = verify.compare(actual, expected, rtol=0.0, atol=atol, names=[quantity]).rows
    return Result(model, quantity, row.max_rel_error, row.passed)


def check_newton_steps(
    device: torch.device, dtype: torch.dtype, tolerance: float, seed: int = 0
) -> list[Result]:
    r"""Batched Newton steps (:mod:`curvkit.ops.newton`) against per-item autograd Hessians.

    The loss :math:`\sum_b \tfrac12 x_b^\top A_b x_b - c_b^\top x_b + \tfrac1{4} \|x_b\|_4^4`
    is convex and not quadratic. The reference differentiates the gradient once per entry of the
    whole batch, keeps each item's diagonal block :math:`H_b` and solves; with a trust radius
    :math:`r`, a step longer than :math:`r` becomes :math:`-(H_b + \mu I)^{-1} g_b` with
    :math:`\mu = \|g_b\| / r - \lambda_{\min}(H_b)` (:math:`d \ge 2`), or is clipped to
    :math:`\pm r` (:math:`d = 1`).

    Args:
        device: Where the problems live.
        dtype: Their dtype.
        tolerance: Relative tolerance.
        seed: Seed of the problems.

    Returns:
        One result per dimension and trust setting.
    """
    results = []
    generator = torch.Generator().manual_seed(seed)
    for dim in (1, 2, 3, 5):
        for trust_radius in (None, 0.5):
            problem = _NewtonProblem(dim, generator, device, dtype)
            label = "Newton step" + (
                "" if trust_radius is None else f", trust radius {trust_radius}"
            )
            results.append(
                _run_check(
                    f"batch of {dim}-d problems",
                    label,
                    lambda p=problem, r=trust_radius: p.check(r),
                    tolerance,
                )
            )
    return results


class _NewtonProblem:
    """A batch of independent convex problems in ``dim`` dimensions."""

    def __init__(
        self, dim: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
    ) -> None:
        def draw(*shape: int) -> Tensor:
            sample = torch.randn(*shape, generator=generator, dtype=torch.float64)
            return sample.to(device=device, dtype=dtype)

        factor = draw(6, dim, dim)
        self.matrices = factor @ factor.mT + 0.1 * torch.eye(dim, device=device, dtype=dtype)
        self.linear = 3 * draw(6, dim)
        self.start = draw(6, dim)

    def loss(self, x: Tensor) -> Tensor:
        quadratic = 0.5 * torch.einsum("bi,bij,bj->", x, self.matrices, x)
        return quadratic - (self.linear * x).sum() + 0.25 * x.pow(4).sum()

    def check(self, trust_radius: float | None) -> tuple[Tensor, Tensor]:
        x = self.start.clone().requires_grad_()
        mode, _ = newton_step(self.loss(x), x, trust_radius)

        x = self.start.clone().requires_grad_()
        (gradient,) = torch.autograd.grad(self.loss(x), x, create_graph=True)
        flat = gradient.reshape(-1)
        rows = [torch.autograd.grad(entry, x, retain_graph=True)[0].reshape(-1) for entry in flat]
        hessian = torch.stack(rows)
        batch, dim = x.shape
        blocks = torch.stack(
            [hessian[b * dim : (b + 1) * dim, b * dim : (b + 1) * dim] for b in range(batch)]
        )
        gradient = gradient.detach()
        step = -torch.linalg.solve(blocks, gradient)
        if trust_radius is not None:
            too_long = step.norm(dim=-1) > trust_radius
            if dim == 1:
                shortened = step.clamp(-trust_radius, trust_radius)
            else:
                shift = gradient.norm(dim=-1) / trust_radius - torch.linalg.eigvalsh(blocks)[:, 0]
                eye = torch.eye(dim, device=x.device, dtype=x.dtype)
                shortened = -torch.linalg.solve(blocks + shift[:, None, None] * eye, gradient)
            step = torch.where(too_long[:, None], shortened, step)
        return mode.detach(), self.start + step


class _References:
    """curvkit's results and their autograd references for one case, as ``(actual, expected)``.

    The dense GGN and the eigendecomposition are computed once and shared by the checks.
    """

    def __init__(self, case: Case) -> None:
        self.case = case
        self.batch = (case.inputs, case.targets)
        self.params = [p for p in case.model.parameters() if p.requires_grad]
        self.ggn = verify.reference_ggn(case.model, case.loss_fn, case.inputs, case.targets)
        self.evals, self.evecs = torch.linalg.eigh(self.ggn)
        self.group = {
            "params": self.params,
            "criterion": curvkit.top_k(NUM_DIRECTIONS),
            "damping": DAMPING,
        }
        self.generator = torch.Generator().manual_seed(0)

    def _random(self, *shape: int) -> Tensor:
        sample = torch.randn(*shape, generator=self.generator, dtype=torch.float64)
        return sample.to(device=self.ggn.device, dtype=self.ggn.dtype)

    def output_hessian(self) -> tuple[Tensor, Tensor]:
        case = self.case
        with torch.no_grad():
            outputs = case.model(*case.inputs)
        sqrt = losses.hessian_sqrt(case.loss_fn, outputs, case.targets).flatten(start_dim=2)
        hessians = torch.einsum("knc,knd->ncd", sqrt, sqrt)
        reference = verify.reference_output_hessian(case.loss_fn, outputs, case.targets)
        return hessians, reference.reshape(hessians.shape)

    def diagonal(self) -> tuple[Tensor, Tensor]:
        return _flat(curvkit.diag_ggn(self.case.model, self.case.loss_fn, self.batch)), (
            self.ggn.diagonal()
        )

    def diagonal_two_batches(self) -> tuple[Tensor, Tensor]:
        split = max(1, len(self.case.targets) // 2)
        inputs, targets = self.case.inputs, self.case.targets
        halves = [
            (tuple(x[:split] for x in inputs), targets[:split]),
            (tuple(x[split:] for x in inputs), targets[split:]),
        ]
        return _flat(curvkit.diag_ggn(self.case.model, self.case.loss_fn, halves)), (
            self.ggn.diagonal()
        )

    def gauss_newton_diagonal(self) -> tuple[Tensor, Tensor]:
        case = self.case
        diagonal = curvkit.gauss_newton_diagonal(
            case.model, case.loss_fn, case.inputs, case.targets
        )
        return _flat(diagonal), self.ggn.diagonal()

    def vector_product(self) -> tuple[Tensor, Tensor]:
        vector = self._random(self.ggn.shape[0])
        product = curvkit.ggn_vector_product(self.case.model, self.case.loss_fn, self.batch, vector)
        return product, self.ggn @ vector

    def columns(self) -> tuple[Tensor, Tensor]:
        dim = self.ggn.shape[0]
        indices = sorted({0, dim // 3, dim // 2, dim - 1})
        columns = dict(
            curvkit.ggn_columns(self.case.model, self.case.loss_fn, self.batch, indices=indices)
        )
        return torch.stack([columns[i] for i in indices]), self.ggn[:, indices].T

    def matrix(self) -> tuple[Tensor, Tensor]:
        return curvkit.ggn_matrix(self.case.model, self.case.loss_fn, self.batch), self.ggn

    def operator(self) -> tuple[Tensor, Tensor]:
        operator = curvkit.GGNOperator(self.case.model, self.case.loss_fn, self.batch)
        matrix = self._random(self.ggn.shape[0], 3)
        return operator @ matrix, self.ggn @ matrix

    def _eigh(self) -> tuple[Tensor, Tensor]:
        [(evals, evecs)] = curvkit.ggn_eigh(
            self.case.model, self.case.loss_fn, self.batch, [self.group]
        )
        return evals, torch.cat([e.flatten(start_dim=1) for e in evecs], dim=1).T

    def eigenvalues(self) -> tuple[Tensor, Tensor]:
        return self._eigh()[0], self.evals[-NUM_DIRECTIONS:]

    def eigenvectors(self) -> tuple[Tensor, Tensor]:
        # Eigenvectors are defined up to sign: compare the projector onto their span.
        _, evecs = self._eigh()
        reference = self.evecs[:, -NUM_DIRECTIONS:]
        return evecs @ evecs.T, reference @ reference.T

    def _directional_reference(self) -> tuple[Tensor, Tensor]:
        """Reference gammas and lambdas along curvkit's own eigenvectors (signs agree)."""
        case = self.case
        _, evecs = self._eigh()
        num_samples = len(case.targets)
        gammas = num_samples * self._sample_gradients() @ evecs
        tangents = self._output_tangents(evecs)  # [K, N, C]
        with torch.no_grad():
            outputs = case.model(*case.inputs)
        hessians = verify.reference_output_hessian(case.loss_fn, outputs, case.targets)
        hessians = hessians.reshape(num_samples, tangents.shape[2], tangents.shape[2])
        lambdas = num_samples * torch.einsum("knc,ncd,knd->nk", tangents, hessians, tangents)
        return gammas, lambdas

    def gammas(self) -> tuple[Tensor, Tensor]:
        [(gammas, _)] = curvkit.directional_derivatives(
            self.case.model, self.case.loss_fn, self.batch, [self.group]
        )
        return gammas, self._directional_reference()[0]

    def lambdas(self) -> tuple[Tensor, Tensor]:
        [(_, lambdas)] = curvkit.directional_derivatives(
            self.case.model, self.case.loss_fn, self.batch, [self.group]
        )
        return lambdas, self._directional_reference()[1]

    def damped_newton_step(self) -> tuple[Tensor, Tensor]:
        case = self.case
        [step] = curvkit.damped_newton_step(case.model, case.loss_fn, self.batch, [self.group])
        loss = case.loss_fn(case.model(*case.inputs), case.targets)
        gradient = _flat(torch.autograd.grad(loss, self.params))
        evals, evecs = self.evals[-NUM_DIRECTIONS:], self.evecs[:, -NUM_DIRECTIONS:]
        return _flat(step), evecs @ (-(evecs.T @ gradient) / (evals + DAMPING))

    def vivit_damped_newton_step(self) -> tuple[Tensor, Tensor]:
        """Curvkit's ViViT-compatible class, run by BackPACK on a copy of the model."""
        from backpack import backpack, extend

        from curvkit.compat.vivit import DirectionalDampedNewtonComputation

        case = self.case
        model, loss_fn = extend(copy.deepcopy(case.model)), extend(copy.deepcopy(case.loss_fn))
        computation = DirectionalDampedNewtonComputation()
        group = {**self.group, "params": [p for p in model.parameters() if p.requires_grad]}
        loss = loss_fn(model(*case.inputs), case.targets)
        with (
            warnings.catch_warnings(),
            backpack(
                *computation.get_extensions(),
                extension_hook=computation.get_extension_hook([group]),
            ),
        ):
            # BackPACK's module hooks trigger torch's notice about full backward hooks on inputs
            # that do not require grad: expected here, and not a finding of the check.
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            loss.backward()
        expected = self.damped_newton_step()[1]
        return _flat(computation.get_result(group)), expected

    def _sample_gradients(self) -> Tensor:
        r""":math:`\nabla L_n` for each sample, ``[N, D]``: the batch loss's gradient through f_n.

        The loss is a sum of per-sample terms, so backpropagating only sample n's rows of
        :math:`\partial L / \partial f` gives the gradient of its contribution :math:`L_n`.
        """
        case = self.case
        outputs = case.model(*case.inputs)
        (output_grad,) = torch.autograd.grad(case.loss_fn(outputs, case.targets), outputs)
        eye = torch.eye(len(case.targets), device=outputs.device, dtype=outputs.dtype)
        masks = eye.reshape(*eye.shape, *[1] * (outputs.dim() - 1))
        grads = torch.autograd.grad(
            outputs, self.params, grad_outputs=masks * output_grad, is_grads_batched=True
        )
        return torch.cat([g.flatten(start_dim=1) for g in grads], dim=1)

    def _output_tangents(self, directions: Tensor) -> Tensor:
        r"""Jacobian-vector products :math:`J e_k` of the outputs, ``[K, N, C]``.

        By the double-vjp trick: :math:`J e = \partial_w \langle J^\top w, e \rangle`.
        """
        case = self.case
        outputs = case.model(*case.inputs)
        dual = torch.zeros_like(outputs, requires_grad=True)
        pullback = torch.autograd.grad(outputs, self.params, dual, create_graph=True)
        sizes = [p.numel() for p in self.params]
        tangents = []
        for direction in directions.T:
            pieces = [
                piece.reshape(p.shape)
                for piece, p in zip(direction.split(sizes), self.params, strict=True)
            ]
            (tangent,) = torch.autograd.grad(pullback, dual, pieces, retain_graph=True)
            tangents.append(tangent.flatten(start_dim=1))
        return torch.stack(tangents)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])
