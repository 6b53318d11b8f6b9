"""GGN quantities: curvkit against BackPACK, torch-secorder and curvlinops, in one run.

Run ``python benchmarks/bench_ggn.py`` (``--quick`` for fewer repeats and no memory runs).

Timing: the methods of a case run round-robin (one call each per round, after two warm-up
rounds) so that a load change on the machine hits all of them alike; the table shows medians of
the process CPU time (``time.process_time``) and of the wall-clock time. On a shared machine the
CPU time is the fair measure: it does not count the time spent waiting for a core. Use
``--threads 1`` for CPU times: with more threads, OpenMP's spin-waiting adds CPU time that is not
work. The methods that take seconds per call (``SLOW``) run twice, not round-robin. A ratio is
the peer's time divided by curvkit's: above 1, curvkit is faster.

Peak extra memory: each (case, method) runs in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc serves every allocation of 64 KiB or more by
``mmap`` and gives it back to the system when freed: the resident set size then follows the live
tensors. After a warm-up call, the peak-RSS counter is reset (``/proc/self/clear_refs``), the
method runs once with its results kept alive, and the peak resident size minus the size before
the call is reported (``VmHWM - VmRSS``, Linux only). Both the peer's and curvkit's results are
included (BackPACK stores them on the parameters); the model, data and warm-up state are not.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import curvkit

# BackPACK's module hooks make torch warn about full backward hooks on inputs that need no
# gradient: the peer's notice, not a finding of this benchmark.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

# ---------------------------------------------------------------------------------------------
# problems


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


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def make_problem(name: str) -> Problem:
    torch.manual_seed(0)
    if name == "mlp-ce":
        model, inputs, loss_fn = (
            mlp([784, 256, 128, 10]),
            torch.randn(128, 784),
            nn.CrossEntropyLoss(),
        )
        targets = torch.randint(0, 10, (128,))
    elif name == "mlp-mse":
        model, inputs, loss_fn = mlp([784, 256, 128, 10]), torch.randn(128, 784), nn.MSELoss()
        targets = torch.randn(128, 10)
    elif name == "cnn-ce":
        model, inputs, loss_fn = small_cnn(), torch.randn(64, 3, 32, 32), nn.CrossEntropyLoss()
        targets = torch.randint(0, 10, (64,))
    elif name == "small-mlp-ce":
        model, inputs, loss_fn = mlp([64, 32, 10]), torch.randn(32, 64), nn.CrossEntropyLoss()
        targets = torch.randint(0, 10, (32,))
    else:
        raise KeyError(name)
    return Problem(model.eval(), loss_fn, inputs, targets)


# ---------------------------------------------------------------------------------------------
# methods: each builds a zero-argument callable from a problem (setup outside the timing)


def gradient(problem: Problem) -> Callable[[], object]:
    params = list(problem.model.parameters())

    def run() -> object:
        loss = problem.loss_fn(problem.model(problem.inputs), problem.targets)
        return torch.autograd.grad(loss, params)

    return run


def curvkit_diag(mc_samples: int) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        data = (problem.inputs, problem.targets)
        return lambda: curvkit.diag_ggn(problem.model, problem.loss_fn, data, mc_samples=mc_samples)

    return build


def backpack_diag(mc_samples: int) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact, DiagGGNMC

        # extend() hooks into the modules for good: a copy keeps them off the other methods' model
        model = extend(copy.deepcopy(problem.model))
        loss_fn = extend(copy.deepcopy(problem.loss_fn))
        extension = DiagGGNExact() if mc_samples == 0 else DiagGGNMC(mc_samples=mc_samples)
        savefield = extension.savefield

        def run() -> object:
            for p in model.parameters():
                p.grad = None
            with backpack(extension):
                loss_fn(model(problem.inputs), problem.targets).backward()
            return [getattr(p, savefield) for p in model.parameters()]

        return run

    return build


def curvkit_gauss_newton(problem: Problem) -> Callable[[], object]:
    return lambda: curvkit.gauss_newton_diagonal(
        problem.model, problem.loss_fn, problem.inputs, problem.targets
    )


def secorder_gauss_newton(problem: Problem) -> Callable[[], object]:
    from torch_secorder.approximations.gauss_newton import gauss_newton_matrix_approximation

    return lambda: gauss_newton_matrix_approximation(
        problem.model, problem.loss_fn, problem.inputs, problem.targets
    )


def curvkit_secorder_compat(problem: Problem) -> Callable[[], object]:
    """torch-secorder's own function and units, computed by curvkit."""
    from curvkit.compat.torch_secorder import gauss_newton_matrix_approximation

    return lambda: gauss_newton_matrix_approximation(
        problem.model, problem.loss_fn, problem.inputs, problem.targets
    )


def curvkit_matrix(problem: Problem) -> Callable[[], object]:
    data = (problem.inputs, problem.targets)
    return lambda: curvkit.ggn_matrix(problem.model, problem.loss_fn, data)


def backpack_columns(problem: Problem) -> Callable[[], object]:
    """BackPACK's autodiff GGN-vector product (R-op, HVP, L-op), once per unit vector."""
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    params = list(problem.model.parameters())

    def run() -> object:
        outputs = problem.model(problem.inputs)
        loss = problem.loss_fn(outputs, problem.targets)
        dim = sum(p.numel() for p in params)
        columns = []
        for i in range(dim):
            unit = torch.zeros(dim)
            unit[i] = 1
            blocks = [
                b.reshape(p.shape)
                for b, p in zip(unit.split([p.numel() for p in params]), params, strict=True)
            ]
            product = ggn_vector_product_from_plist(loss, outputs, params, blocks)
            columns.append(torch.cat([c.reshape(-1) for c in product]))
        return torch.stack(columns, dim=1)

    return run


def curvlinops_matrix(problem: Problem) -> Callable[[], object]:
    from curvlinops import GGNLinearOperator

    params = list(problem.model.parameters())
    operator = GGNLinearOperator(
        problem.model,
        problem.loss_fn,
        params,
        [(problem.inputs, problem.targets)],
        check_deterministic=False,
    )
    dim = sum(p.numel() for p in params)
    identity = torch.eye(dim)
    return lambda: operator @ identity


def fixed_vector(problem: Problem) -> Tensor:
    """The vector every GGN-vector product of a case multiplies, shared by all methods."""
    dim = sum(p.numel() for p in problem.model.parameters())
    return torch.randn(dim, generator=torch.Generator().manual_seed(1))


def curvkit_product(problem: Problem) -> Callable[[], object]:
    data = (problem.inputs, problem.targets)
    vector = fixed_vector(problem)
    return lambda: curvkit.ggn_vector_product(problem.model, problem.loss_fn, data, vector)


def backpack_product(problem: Problem) -> Callable[[], object]:
    from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

    params = list(problem.model.parameters())
    sizes = [p.numel() for p in params]
    vector = [
        v.reshape(p.shape) for v, p in zip(fixed_vector(problem).split(sizes), params, strict=True)
    ]

    def run() -> object:
        outputs = problem.model(problem.inputs)
        loss = problem.loss_fn(outputs, problem.targets)
        return ggn_vector_product_from_plist(loss, outputs, params, vector)

    return run


def curvlinops_product(problem: Problem) -> Callable[[], object]:
    from curvlinops import GGNLinearOperator

    params = list(problem.model.parameters())
    operator = GGNLinearOperator(
        problem.model,
        problem.loss_fn,
        params,
        [(problem.inputs, problem.targets)],
        check_deterministic=False,
    )
    vector = fixed_vector(problem)
    return lambda: operator @ vector


METHODS: dict[str, Callable[[Problem], Callable[[], object]]] = {
    "gradient": gradient,
    "curvkit diag_ggn": curvkit_diag(0),
    "BackPACK DiagGGNExact": backpack_diag(0),
    "curvkit diag_ggn MC": curvkit_diag(1),
    "BackPACK DiagGGNMC": backpack_diag(1),
    "curvkit gauss_newton_diagonal": curvkit_gauss_newton,
    "torch-secorder GN diagonal": secorder_gauss_newton,
    "curvkit.compat.torch_secorder": curvkit_secorder_compat,
    "curvkit ggn_matrix": curvkit_matrix,
    "BackPACK ggnvp per column": backpack_columns,
    "curvlinops GGN @ I": curvlinops_matrix,
    "curvkit ggn_vector_product": curvkit_product,
    "BackPACK ggnvp": backpack_product,
    "curvlinops GGN @ v": curvlinops_product,
}

# (title, problem, curvkit method, {peer: target ratio or None})
CASES: list[tuple[str, str, str, dict[str, float | None]]] = [
    ("exact diagonal, MLP, CE", "mlp-ce", "curvkit diag_ggn", {"BackPACK DiagGGNExact": 1.0}),
    ("exact diagonal, MLP, MSE", "mlp-mse", "curvkit diag_ggn", {"BackPACK DiagGGNExact": 1.0}),
    ("exact diagonal, CNN, CE", "cnn-ce", "curvkit diag_ggn", {"BackPACK DiagGGNExact": 1.0}),
    ("MC diagonal, MLP, CE", "mlp-ce", "curvkit diag_ggn MC", {"BackPACK DiagGGNMC": 1.0}),
    ("MC diagonal, MLP, MSE", "mlp-mse", "curvkit diag_ggn MC", {"BackPACK DiagGGNMC": 1.0}),
    ("MC diagonal, CNN, CE", "cnn-ce", "curvkit diag_ggn MC", {"BackPACK DiagGGNMC": 1.0}),
    (
        "Gauss-Newton diagonal, MLP, MSE",
        "mlp-mse",
        "curvkit gauss_newton_diagonal",
        {"torch-secorder GN diagonal": 100.0},
    ),
    (
        "torch-secorder's Gauss-Newton diagonal by its own name, MLP, MSE",
        "mlp-mse",
        "curvkit.compat.torch_secorder",
        {"torch-secorder GN diagonal": 100.0},
    ),
    (
        "dense GGN, MLP 64-32-10, N=32, CE",
        "small-mlp-ce",
        "curvkit ggn_matrix",
        {"BackPACK ggnvp per column": 20.0, "curvlinops GGN @ I": None},
    ),
    (
        "GGN-vector product, MLP, CE",
        "mlp-ce",
        "curvkit ggn_vector_product",
        {"BackPACK ggnvp": None, "curvlinops GGN @ v": None},
    ),
    (
        "GGN-vector product, CNN, CE",
        "cnn-ce",
        "curvkit ggn_vector_product",
        {"BackPACK ggnvp": None, "curvlinops GGN @ v": None},
    ),
]

SLOW = {"BackPACK ggnvp per column", "torch-secorder GN diagonal"}


# ---------------------------------------------------------------------------------------------
# measurement


@dataclass
class Timing:
    wall: float
    cpu: float


def _timed(run: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_round_robin(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
    """Median wall and CPU times: two warm-up rounds, then ``repeats`` rounds, one call each."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    fast = {name: run for name, run in runs.items() if name not in SLOW}
    for round_ in range(repeats + 2):
        for name, run in fast.items():
            sample = _timed(run)
            if round_ >= 2:
                samples[name].append(sample)
    for name in runs.keys() & SLOW:  # seconds per call: warm-up effects are negligible
        samples[name] = [_timed(runs[name]) for _ in range(2)]
    return {
        name: Timing(
            statistics.median(w for w, _ in values), statistics.median(c for _, c in values)
        )
        for name, values in samples.items()
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def peak_extra_memory_child(problem_name: str, method: str) -> None:
    """In the subprocess: print the peak extra resident memory (KiB) of one call."""
    import ctypes

    run = METHODS[method](make_problem(problem_name))
    run()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak resident set size to the current one
    before = _status_kib("VmRSS")
    result = run()
    peak = _status_kib("VmHWM")
    del result
    print(json.dumps({"extra_kib": peak - before}))


def peak_extra_memory(problem_name: str, method: str) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    output = subprocess.run(
        [sys.executable, __file__, "--memory-child", problem_name, method],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])["extra_kib"] / 1024


def check_agreement(
    problem: Problem, ours_name: str, curvkit_result: object, peer: str, peer_result: object
) -> float:
    """Relative difference of curvkit's and a peer's results (the peers' conventions matched)."""

    def flat(result: object) -> Tensor:
        if isinstance(result, Tensor):
            return result.detach().reshape(-1)
        return torch.cat([t.detach().reshape(-1) for t in result])  # type: ignore[attr-defined]

    ours, theirs = flat(curvkit_result), flat(peer_result)
    if ours_name == "curvkit gauss_newton_diagonal":  # diag(J^T J): see its docs
        ours = ours / (2 / problem.targets.numel())
    if "MC" in peer:
        return float("nan")  # independent random samples: nothing to compare
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# report


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
    parser.add_argument("--quick", action="store_true", help="3 rounds, no memory runs")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per case")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--cases", nargs="*", type=int, help="indices of the cases to run")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_extra_memory_child(*args.memory_child)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    memory = not (args.quick or args.no_memory) and sys.platform == "linux"

    print(f"Machine: {machine()}\n")
    print(
        "| case | method | CPU time [ms] | x gradient | ratio peer/curvkit (CPU) | wall [ms] "
        "| ratio (wall) | target | peak extra memory [MiB] | max rel. diff. |"
    )
    print("|" + "---|" * 10)
    selected = [CASES[i] for i in args.cases] if args.cases else CASES
    for title, problem_name, ours, peers in selected:
        problem = make_problem(problem_name)
        runs = {name: METHODS[name](problem) for name in ["gradient", ours, *peers]}
        targets: dict[str, float | None] = {ours: None, **peers}
        times = time_round_robin(runs, repeats)
        reference = runs[ours]()
        for name in [ours, *peers]:
            cpu_ratio = times[name].cpu / times[ours].cpu
            wall_ratio = times[name].wall / times[ours].wall
            difference = ""
            if name != ours:
                difference = f"{check_agreement(problem, ours, reference, name, runs[name]()):.1e}"
            target_text = ""
            target = targets[name]
            if target is not None:
                target_text = f">= {target:g} ({'met' if cpu_ratio >= target else 'MISSED'})"
            measure = memory and name not in SLOW and "diagonal" in title
            extra = f"{peak_extra_memory(problem_name, name):.1f}" if measure else ""
            print(
                f"| {title} | {name} | {1e3 * times[name].cpu:.2f} | "
                f"{times[name].cpu / times['gradient'].cpu:.1f} | {cpu_ratio:.2f} | "
                f"{1e3 * times[name].wall:.2f} | {wall_ratio:.2f} | {target_text} | {extra} | "
                f"{difference} |",
                flush=True,
            )
    print(f"\nAt the end: {machine()}")


if __name__ == "__main__":
    main()
