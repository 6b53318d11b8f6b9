"""Randomized estimators and spectral densities of the GGN: curvkit against curvlinops, in one run.

Run ``python benchmarks/bench_estimators.py --threads 1`` (``--quick`` for 3 rounds,
``--resnet`` to add ResNet-18 on CIFAR-sized images, N 32, which takes minutes per call).

Each method is one user-level call, operator construction included: curvkit builds a
:class:`curvkit.GGNOperator` and calls :func:`curvkit.randomized.estimators.hutchinson_trace`,
:func:`~curvkit.randomized.estimators.xtrace` or :func:`curvkit.spectral_density`; curvlinops
builds a ``GGNLinearOperator`` and calls its ``hutchinson_trace``, ``xtrace`` or
``LanczosApproximateSpectrumCached(...).approximate_spectrum`` (its boundaries by SciPy's
``eigsh``, its default). Both sides spend the same number of products with the GGN (Hutchinson,
XTrace) or the same Lanczos steps and repeats (SLQ). Without given boundaries, curvlinops adds
SciPy's ``eigsh`` for the extreme eigenvalues (slow for the smallest one of a singular GGN),
which curvkit takes from the Ritz values of its own runs; the "boundaries given" case passes
both the same ``(0, lambda_max)`` and times the Lanczos runs alone.

Timing as in ``bench_ggn.py``: the methods of a case run round-robin after two warm-up rounds,
medians of the process CPU time and of the wall-clock time; a ratio is curvkit's time divided by
the peer's (the targets are <= 0.7). The accuracy column compares each estimate with the exact
value: the trace from :func:`curvkit.diag_ggn`, and for SLQ the density's mean against
:math:`\\operatorname{tr}(G)/D`.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import curvkit
from curvkit.randomized import estimators


@dataclass
class Problem:
    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def resnet18() -> nn.Module:
    """bench_real_size.py's ResNet-18 (CIFAR stem), loaded from its file: no torchvision."""
    path = Path(__file__).with_name("bench_real_size.py")
    spec = importlib.util.spec_from_file_location("bench_real_size", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.resnet18()


def make_problem(name: str) -> Problem:
    torch.manual_seed(0)
    if name == "mlp":
        model, inputs = mlp([784, 256, 128, 10]), torch.randn(128, 784)
        targets = torch.randint(0, 10, (128,))
    elif name == "resnet18":
        model, inputs = resnet18(), torch.randn(32, 3, 32, 32)
        targets = torch.randint(0, 10, (32,))
    else:
        raise KeyError(name)
    return Problem(model.eval(), nn.CrossEntropyLoss(), inputs, targets)


# ---------------------------------------------------------------------------------------------
# methods: each builds a zero-argument callable (a user's whole call) from a problem


def curvkit_operator(problem: Problem) -> curvkit.GGNOperator:
    return curvkit.GGNOperator(problem.model, problem.loss_fn, (problem.inputs, problem.targets))


def curvlinops_operator(problem: Problem) -> object:
    from curvlinops import GGNLinearOperator

    return GGNLinearOperator(
        problem.model,
        problem.loss_fn,
        list(problem.model.parameters()),
        [(problem.inputs, problem.targets)],
        check_deterministic=False,
    )


def curvkit_trace(name: str, num_matvecs: int) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        estimator = getattr(estimators, name)
        return lambda: estimator(curvkit_operator(problem), num_matvecs)

    return build


def curvlinops_trace(name: str, num_matvecs: int) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        import curvlinops

        estimator = getattr(curvlinops, name)
        return lambda: estimator(curvlinops_operator(problem), num_matvecs)

    return build


def spectrum_boundaries(problem: Problem) -> tuple[float, float]:
    """``(0, lambda_max)`` of the GGN (positive semi-definite), computed before the timing."""
    top = curvkit.lanczos_top_eigenpairs(curvkit_operator(problem), 1)
    return 0.0, float(top.eigenvalues[0])


def curvkit_density(
    num_iters: int, repeats: int, given: bool
) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        boundaries = spectrum_boundaries(problem) if given else None
        return lambda: curvkit.spectral_density(
            curvkit_operator(problem),
            num_iters=num_iters,
            num_repeats=repeats,
            boundaries=boundaries,
        )

    return build


def curvlinops_density(
    num_iters: int, repeats: int, given: bool
) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        from curvlinops import LanczosApproximateSpectrumCached

        boundaries = spectrum_boundaries(problem) if given else None

        def run() -> object:
            cached = LanczosApproximateSpectrumCached(
                curvlinops_operator(problem), num_iters, boundaries=boundaries
            )
            return cached.approximate_spectrum(num_repeats=repeats)

        return run

    return build


def gradient(problem: Problem) -> Callable[[], object]:
    params = list(problem.model.parameters())

    def run() -> object:
        loss = problem.loss_fn(problem.model(problem.inputs), problem.targets)
        return torch.autograd.grad(loss, params)

    return run


# (title, problem, {method name: builder}, curvkit's method, peer's method, kind)
def cases(num_matvecs: int, num_iters: int, repeats: int, problems: list[str]) -> list[tuple]:
    out = []
    for name in problems:
        out += [
            (
                f"Hutchinson trace, {num_matvecs} products, {name}",
                name,
                curvkit_trace("hutchinson_trace", num_matvecs),
                curvlinops_trace("hutchinson_trace", num_matvecs),
                "trace",
            ),
            (
                f"XTrace, {num_matvecs} products, {name}",
                name,
                curvkit_trace("xtrace", num_matvecs),
                curvlinops_trace("xtrace", num_matvecs),
                "trace",
            ),
            (
                f"SLQ density, {num_iters} steps x {repeats} repeats, boundaries given, {name}",
                name,
                curvkit_density(num_iters, repeats, given=True),
                curvlinops_density(num_iters, repeats, given=True),
                "density",
            ),
            (
                f"SLQ density, {num_iters} steps x {repeats} repeats, {name}",
                name,
                curvkit_density(num_iters, repeats, given=False),
                curvlinops_density(num_iters, repeats, given=False),
                "density",
            ),
        ]
    return out


# ---------------------------------------------------------------------------------------------
# measurement and report


@dataclass
class Timing:
    wall: float
    cpu: float


def _timed(run: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_round_robin(
    runs: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, Timing]:
    """Median wall and CPU times: ``warmup`` rounds, then ``repeats`` rounds, one call each."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for round_ in range(repeats + warmup):
        for name, run in runs.items():
            sample = _timed(run)
            if round_ >= warmup:
                samples[name].append(sample)
    return {
        name: Timing(
            statistics.median(w for w, _ in values), statistics.median(c for _, c in values)
        )
        for name, values in samples.items()
    }


def relative_error(problem: Problem, kind: str, result: object) -> float:
    """The estimate's distance from the exact value, relative to it."""
    exact_diagonal = curvkit.diag_ggn(
        problem.model, problem.loss_fn, (problem.inputs, problem.targets)
    )
    trace = sum(float(d.sum()) for d in exact_diagonal)
    if kind == "trace":
        return abs(float(result) - trace) / trace  # type: ignore[arg-type]
    grid, density = result  # type: ignore[misc]
    dim = sum(p.numel() for p in problem.model.parameters())
    mean = float(torch.trapezoid(density * grid, grid) / torch.trapezoid(density, grid))
    return abs(mean - trace / dim) / (trace / dim)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        cpu = f"{names[0]} x{len(names)}" if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}; load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case")
    parser.add_argument("--num-matvecs", type=int, default=30, help="products per trace")
    parser.add_argument("--num-iters", type=int, default=40, help="Lanczos steps per SLQ run")
    parser.add_argument("--slq-repeats", type=int, default=4, help="SLQ runs averaged over")
    parser.add_argument("--slq-rounds", type=int, default=3, help="timed rounds per SLQ case")
    parser.add_argument("--cases", nargs="*", type=int, help="indices of the cases to run")
    parser.add_argument("--resnet", action="store_true", help="add ResNet-18 (CIFAR, N 32)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    problems = ["mlp", "resnet18"] if args.resnet else ["mlp"]
    print(f"Machine: {machine()}\n")
    print(
        "| case | method | CPU time [ms] | x gradient | ratio curvkit/peer (CPU) | wall [ms] "
        "| ratio (wall) | target | rel. error vs exact |"
    )
    print("|" + "---|" * 9)
    selected = cases(args.num_matvecs, args.num_iters, args.slq_repeats, problems)
    if args.cases:
        selected = [selected[i] for i in args.cases]
    for title, problem_name, ours, peer, kind in selected:
        problem = make_problem(problem_name)
        runs = {
            "gradient": gradient(problem),
            "curvkit": ours(problem),
            "curvlinops": peer(problem),
        }
        # An SLQ call or a ResNet call takes seconds: one warm-up round is enough.
        slow = kind == "density" or problem_name != "mlp"
        rounds = min(repeats, args.slq_rounds) if slow else repeats
        times = time_round_robin(runs, rounds, warmup=1 if slow else 2)
        for name in ("curvkit", "curvlinops"):
            cpu_ratio = times["curvkit"].cpu / times[name].cpu
            wall_ratio = times["curvkit"].wall / times[name].wall
            target = ""
            if name == "curvlinops":
                target = f"<= 0.7 ({'met' if cpu_ratio <= 0.7 else 'MISSED'})"
            error = relative_error(problem, kind, runs[name]())
            print(
                f"| {title} | {name} | {1e3 * times[name].cpu:.1f} | "
                f"{times[name].cpu / times['gradient'].cpu:.0f} | {cpu_ratio:.2f} | "
                f"{1e3 * times[name].wall:.1f} | {wall_ratio:.2f} | {target} | {error:.2e} |",
                flush=True,
            )
    print(f"\nAt the end: {machine()}")


if __name__ == "__main__":
    sys.exit(main())
