"""Directionally damped Newton steps: curvkit against ViViT, side by side in one run.

Times: all implementations are set up in this process (each on its own copy of the same model)
and their steps are timed in turns, round after round, so that a change in the machine's load
hits all of them alike; the table gives the median per implementation. Memory: each
(problem, implementation) pair runs once more in a fresh subprocess, whose extra peak memory is
its peak resident set size (``VmHWM``, reset just before) during the first step minus its resident
size just before it (model, data and libraries loaded). The table gives curvkit's speed-up and
memory ratio against ViViT, and the relative difference of the exact steps (float32, so 1e-4 is
agreement).

ViViT calls ``Tensor.symeig``, which torch 2 removed; in this benchmark only, it is shimmed with
:func:`torch.linalg.eigh`. curvkit never needs it. ``curvkit-backpack`` is curvkit's ViViT
drop-in (same BackPACK extensions as ViViT, curvkit's Gram-space mathematics).

Usage::

    python benchmarks/bench_directional.py                 # all problems, torch's default threads
    python benchmarks/bench_directional.py --threads 1     # pinned threads (a loaded machine)
    python benchmarks/bench_directional.py --problems mlp-exact --repeats 5
    python benchmarks/bench_directional.py --quick             # Monte-Carlo problems only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

# BackPACK's module hooks make torch warn about full backward hooks on inputs that need no
# gradient: the peer's notice, not a finding of this benchmark.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

PROBLEMS = {
    # name: (model, batch size, Monte-Carlo samples)
    "mlp-exact": ("mlp", 128, 0),
    "mlp-mc": ("mlp", 128, 1),
    "cnn-exact": ("cnn", 64, 0),
    "cnn-mc": ("cnn", 64, 1),
}
IMPLEMENTATIONS = ("vivit", "curvkit", "curvkit-backpack")
TOP_K = 10
DAMPING = 1.0


def build(model_name: str, batch_size: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if model_name == "mlp":
        model = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )
        inputs = torch.randn(batch_size, 784)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 8 * 8, 10),
        )
        inputs = torch.randn(batch_size, 3, 32, 32)
    targets = torch.randint(0, 10, (batch_size,))
    return model.eval(), inputs, targets


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's peak across exec.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak memory needs Linux")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # then the peak since the start of the process, no smaller than the step's


def _symeig(self: torch.Tensor, eigenvectors: bool = False, upper: bool = True):
    uplo = "U" if upper else "L"
    if eigenvectors:
        return torch.linalg.eigh(self, UPLO=uplo)
    return torch.linalg.eigvalsh(self, UPLO=uplo), torch.empty(0, dtype=self.dtype)


def step_function(implementation: str, problem: str):
    import curvkit

    model_name, batch_size, mc_samples = PROBLEMS[problem]
    model, inputs, targets = build(model_name, batch_size)
    loss_fn = nn.CrossEntropyLoss()
    criterion = curvkit.top_k(TOP_K)
    params = list(model.parameters())

    if implementation == "curvkit":
        groups = [{"params": params, "criterion": criterion, "damping": DAMPING}]

        def run() -> list[torch.Tensor]:
            (step,) = curvkit.damped_newton_step(
                model, loss_fn, (inputs, targets), groups, mc_samples=mc_samples
            )
            return step

        return run

    from backpack import backpack, extend

    if implementation == "vivit":
        torch.Tensor.symeig = _symeig
        from vivit import DirectionalDampedNewtonComputation
    else:
        from curvkit import DirectionalDampedNewtonComputation

    model, loss_fn = extend(model), extend(loss_fn)
    group = {
        "params": params,
        "criterion": criterion,
        "damping": lambda evals, evecs, gammas, lambdas: torch.full_like(evals, DAMPING),
    }

    def run() -> list[torch.Tensor]:
        computation = DirectionalDampedNewtonComputation(mc_samples_ggn=mc_samples)
        loss = loss_fn(model(inputs), targets)
        with backpack(
            *computation.get_extensions(), extension_hook=computation.get_extension_hook([group])
        ):
            loss.backward()
        model.zero_grad(set_to_none=True)
        return computation.get_result(group)

    return run


def worker(implementation: str, problem: str, threads: int, out: str) -> None:
    warnings.simplefilter("ignore")
    if threads > 0:
        torch.set_num_threads(threads)
    run = step_function(implementation, problem)
    before = _rss_bytes()
    _reset_peak_rss()
    step = run()
    extra_peak = max(_peak_rss_bytes() - before, 0)
    torch.save([s.detach() for s in step], out + ".pt")
    with open(out, "w") as result:
        json.dump({"extra_peak": extra_peak}, result)


def measure_memory(implementation: str, problem: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        command = [sys.executable, __file__, "--worker", implementation, problem]
        command += ["--threads", str(threads), "--out", out]
        subprocess.run(command, check=True)
        with open(out) as result:
            measured = json.load(result)
        measured["step"] = torch.cat([s.flatten() for s in torch.load(out + ".pt")])
    return measured


def measure_times(problem: str, repeats: int) -> dict[str, float]:
    runs = {impl: step_function(impl, problem) for impl in IMPLEMENTATIONS}
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {impl: [] for impl in IMPLEMENTATIONS}
    for _ in range(repeats):
        for implementation, run in runs.items():
            start = time.perf_counter()
            run()
            times[implementation].append(time.perf_counter() - start)
    return {impl: statistics.median(values) for impl, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument(
        "--quick", action="store_true", help="Monte-Carlo problems only, 2 repeats (a smoke run)"
    )
    parser.add_argument("--worker", nargs=2, metavar=("IMPLEMENTATION", "PROBLEM"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker, args.threads, args.out)
        return
    warnings.simplefilter("ignore")
    if args.quick:
        args.problems, args.repeats = ["mlp-mc", "cnn-mc"], 2

    threads = args.threads or torch.get_num_threads()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{threads} torch threads, torch {torch.__version__}, CPU, float32; "
        f"CrossEntropyLoss, top-{TOP_K}, damping {DAMPING}; median of {args.repeats} steps\n"
    )
    header = (
        "| problem | implementation | time [ms] | extra peak memory [MB] "
        "| speed-up vs ViViT | memory vs ViViT | step rel. diff. vs ViViT |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for problem in args.problems:
        times = measure_times(problem, args.repeats)
        memory = {impl: measure_memory(impl, problem, args.threads) for impl in IMPLEMENTATIONS}
        reference = memory["vivit"]
        for implementation in IMPLEMENTATIONS:
            measured = memory[implementation]
            speedup = times["vivit"] / times[implementation]
            memory_ratio = measured["extra_peak"] / max(reference["extra_peak"], 1)
            if PROBLEMS[problem][2] == 0:
                diff = (measured["step"] - reference["step"]).norm() / reference["step"].norm()
                diff_text = f"{float(diff):.1e}"
            else:
                diff_text = "(random)"
            print(
                f"| {problem} | {implementation} | {1e3 * times[implementation]:.0f} "
                f"| {measured['extra_peak'] / 2**20:.0f} | {speedup:.1f}x | {memory_ratio:.2f} "
                f"| {diff_text} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
