"""KFAC: curvkit against curvlinops (and BackPACK's KFAC/KFLR where it runs), in one run.

Run ``python benchmarks/bench_kfac.py`` (``--quick``: fewer repeats, no memory runs, no LM).

Cases: building the Kronecker factors (a fresh operator per call, so nothing is cached) on an MLP
784-256-128-10 (N 128, cross-entropy), ResNet-18 (CIFAR stem, BatchNorm in eval mode, N 32; the
Linear and convolution parameters, which are the ones curvlinops covers) and the GPT-style LM
of ``bench_real_size.py`` (8 x 64 tokens; its Linear layers; Monte-Carlo only: the exact square
root of a 4096-class loss at 64 positions has 262144 columns); for the MLP also the Monte-Carlo
factors as a multiple of one gradient; and applying the damped inverse (``damping=1e-3``, the
inverse of ``F + damping I``: curvlinops' ``use_exact_damping=True``) to a vector with the
inverse built and warmed up outside the timing.

Timing as in ``bench_ggn.py``: the methods of a case run round-robin after two warm-up rounds;
medians of process CPU time and of wall-clock time. Peak extra memory: one fresh subprocess per
(case, method), ``MALLOC_MMAP_THRESHOLD_=65536``, ``VmHWM - VmRSS`` of one call after a warm-up
(Linux only). Each case also checks that curvkit's and curvlinops' factors agree (exact cases).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import curvkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_size import LanguageModel, resnet18

warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

Problem = tuple[nn.Module, nn.Module, Tensor, Tensor, list[Tensor]]


def make_problem(name: str) -> Problem:
    torch.manual_seed(0)
    if name == "mlp":
        sizes = [784, 256, 128, 10]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        model = nn.Sequential(*layers[:-1]).eval()
        inputs, targets = torch.randn(128, 784), torch.randint(0, 10, (128,))
    elif name == "resnet18":
        model = resnet18().eval()
        inputs, targets = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    elif name == "lm":
        model = LanguageModel().eval()
        tokens = torch.randint(0, 4096, (8, 65))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
    else:
        raise KeyError(name)
    params = [
        p
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        for p in m.parameters(recurse=False)
    ]
    return model, nn.CrossEntropyLoss(), inputs, targets, params


# ---------------------------------------------------------------------------------------------
# methods: each builds a zero-argument callable from a problem (setup outside the timing)


def gradient(problem: Problem) -> Callable[[], object]:
    model, loss_fn, x, y, params = problem
    return lambda: torch.autograd.grad(loss_fn(model(x), y), params)


def curvkit_factors(fisher_type: str) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        model, loss_fn, x, y, params = problem

        def run() -> object:
            op = curvkit.KFACOperator(
                model,
                loss_fn,
                (x, y),
                params=params,
                fisher_type=fisher_type,
                generator=torch.Generator().manual_seed(0),
            )
            return op.factors

        return run

    return build


def curvlinops_factors(fisher_type: str) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        from curvlinops import KFACLinearOperator

        model, loss_fn, x, y, params = problem
        num_terms = y.numel() // len(y)

        def run() -> object:
            op = KFACLinearOperator(
                model,
                loss_fn,
                params,
                [(x, y)],
                fisher_type={"exact": "type-2"}.get(fisher_type, fisher_type),
                check_deterministic=False,
                num_data=len(x),
                num_per_example_loss_terms=num_terms,
            )
            op.compute_kronecker_factors()
            return op._input_covariances, op._gradient_covariances

        return run

    return build


def backpack_factors(extension_name: str) -> Callable[[Problem], Callable[[], object]]:
    def build(problem: Problem) -> Callable[[], object]:
        from backpack import backpack, extend, extensions

        model, loss_fn, x, y, _ = problem
        model, loss_fn = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
        extension = getattr(extensions, extension_name)()

        def run() -> object:
            for p in model.parameters():
                p.grad = None
            with backpack(extension):
                loss_fn(model(x), y).backward()
            return [getattr(p, extension.savefield) for p in model.parameters()]

        return run

    return build


def fixed_vector(params: list[Tensor]) -> Tensor:
    return torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))


DAMPING = 1e-3


def curvkit_inverse(problem: Problem) -> Callable[[], object]:
    model, loss_fn, x, y, params = problem
    op = curvkit.KFACOperator(model, loss_fn, (x, y), params=params)
    inverse = op.inverse(DAMPING)
    vector = fixed_vector(params)
    return lambda: inverse @ vector


def curvlinops_inverse(problem: Problem) -> Callable[[], object]:
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    model, loss_fn, x, y, params = problem
    op = KFACLinearOperator(
        model, loss_fn, params, [(x, y)], fisher_type="type-2", check_deterministic=False
    )
    inverse = KFACInverseLinearOperator(op, damping=DAMPING, use_exact_damping=True)
    vector = fixed_vector(params)
    return lambda: inverse @ vector


METHODS: dict[str, Callable[[Problem], Callable[[], object]]] = {
    "gradient": gradient,
    "curvkit KFAC exact": curvkit_factors("exact"),
    "curvlinops KFAC type-2": curvlinops_factors("exact"),
    "BackPACK KFLR": backpack_factors("KFLR"),
    "curvkit KFAC mc": curvkit_factors("mc"),
    "curvlinops KFAC mc": curvlinops_factors("mc"),
    "BackPACK KFAC": backpack_factors("KFAC"),
    "curvkit inverse @ v": curvkit_inverse,
    "curvlinops KFACInverse @ v": curvlinops_inverse,
}

# (title, problem, curvkit method, {peer: target time ratio curvkit / peer, or None})
CASES: list[tuple[str, str, str, dict[str, float | None]]] = [
    (
        "factors exact, MLP",
        "mlp",
        "curvkit KFAC exact",
        {"curvlinops KFAC type-2": 0.7, "BackPACK KFLR": None},
    ),
    (
        "factors MC, MLP",
        "mlp",
        "curvkit KFAC mc",
        {"curvlinops KFAC mc": 0.7, "BackPACK KFAC": None, "gradient": 1.5},
    ),
    ("factors exact, ResNet-18", "resnet18", "curvkit KFAC exact", {"curvlinops KFAC type-2": 0.7}),
    ("factors MC, ResNet-18", "resnet18", "curvkit KFAC mc", {"curvlinops KFAC mc": 0.7}),
    ("factors MC, GPT LM", "lm", "curvkit KFAC mc", {"curvlinops KFAC mc": 0.7, "gradient": 1.5}),
    ("damped inverse @ v, MLP", "mlp", "curvkit inverse @ v", {"curvlinops KFACInverse @ v": 1.0}),
    (
        "damped inverse @ v, ResNet-18",
        "resnet18",
        "curvkit inverse @ v",
        {"curvlinops KFACInverse @ v": 1.0},
    ),
]


# ---------------------------------------------------------------------------------------------
# measurement


def _timed(run: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_round_robin(
    runs: dict[str, Callable[[], object]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds: two warm-up rounds, then ``repeats`` rounds, one call each."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for round_ in range(repeats + 2):
        for name, run in runs.items():
            sample = _timed(run)
            if round_ >= 2:
                samples[name].append(sample)
    return {
        name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
        for name, s in samples.items()
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
        clear_refs.write("5")
    before = _status_kib("VmRSS")
    result = run()
    peak = _status_kib("VmHWM")
    del result
    print(json.dumps({"extra_kib": peak - before}))


def peak_extra_memory(problem_name: str, method: str, threads: int) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, "--threads", str(threads)]
    output = subprocess.run(
        [*command, "--memory-child", problem_name, method],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])["extra_kib"] / 1024


def agreement(problem: Problem) -> float:
    """Largest relative difference of curvkit's and curvlinops' exact factors (A and B)."""
    ours = curvkit_factors("exact")(problem)()
    inputs, grads = curvlinops_factors("exact")(problem)()
    worst = 0.0
    for name, block in ours.items():  # type: ignore[union-attr]
        for mine, theirs in ((block.A, inputs.get(name)), (block.B, grads[name])):
            if mine is not None and theirs is not None:
                worst = max(worst, ((mine - theirs).norm() / theirs.norm()).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, no memory, no LM")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--only", nargs="*", default=None, help="problems to run (mlp, ...)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_extra_memory_child(*args.memory_child)
        return
    repeats = 2 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {args.threads} thread(s), {repeats} repeats")
    print(
        f"{'case':34} {'method':28} {'wall ms':>9} {'cpu ms':>9} {'ratio':>7} {'target':>7}"
        f" {'peak MiB':>9}"
    )
    for title, problem_name, ours, peers in CASES:
        if args.only and problem_name not in args.only:
            continue
        if args.quick and problem_name == "lm":
            continue
        problem = make_problem(problem_name)
        runs = {}
        for name in (ours, *peers):
            try:
                runs[name] = METHODS[name](problem)
                runs[name]()
            except Exception as error:  # a peer that does not run on this model
                print(f"{title:34} {name:28} does not run: {type(error).__name__}: {error}"[:160])
                runs.pop(name, None)
        timings = time_round_robin(runs, repeats)
        for name, (wall, cpu) in timings.items():
            ratio = cpu / timings[ours][1] if name != ours else 1.0
            target = peers.get(name)
            memory = (
                "" if args.quick else f"{peak_extra_memory(problem_name, name, args.threads):9.1f}"
            )
            # ratio: curvkit's CPU time as a multiple of this method's (target: at most).
            shown = f"{1 / ratio:7.2f}" if name != ours else "       "
            target_text = f"{target:7.2f}" if target is not None else "       "
            print(
                f"{title:34} {name:28} {1e3 * wall:9.1f} {1e3 * cpu:9.1f} {shown} {target_text}"
                f" {memory}"
            )
        if "exact" in ours:
            print(
                f"{title:34} factors agree with curvlinops to {agreement(problem):.1e} (relative)"
            )


if __name__ == "__main__":
    main()
