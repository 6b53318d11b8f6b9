"""Laplace (issue 23): laplace-torch 0.3 on its default curvlinops backend against curvkit.

Run ``python benchmarks/bench_laplace.py`` (``--quick``: one timed round, no memory run).

Cases, all float32, classification:

- ``fit`` of a diagonal and of a Kronecker-factored all-weights Laplace on an MLP 784-256-256-10,
  N = 512 in batches of 128; ``fit`` of a full Laplace on an MLP 64-64-10 (same data sizes);
- the GLM predictive (probit) of the diagonal Laplace on 128 inputs.

Methods: laplace-torch with its default backend (``CurvlinopsGGN``), laplace-torch with
``backend=CurvkitGGN`` (:mod:`curvkit.compat.laplace`), and ``curvkit.laplace`` where it is
installed. Timing: the methods of a case run round-robin after one warm-up round; medians of
wall-clock time; ratios against laplace-torch's default in the same process.

Memory (``--memory``, also part of the default run): a fresh subprocess per method fits a
diagonal Laplace on an MLP 2048-2048-2048-1000 (about 10.4M parameters, 1000 classes; 8 inputs)
and asks for its GLM predictive on 2 inputs; its peak resident set size (``VmHWM``) is
reported, and the size of the ``[B, C, P]`` Jacobian laplace-torch's path asks for.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")

N_DATA, BATCH = 512, 128


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def problem(sizes: list[int], n: int = N_DATA) -> tuple[nn.Module, DataLoader, torch.Tensor]:
    torch.manual_seed(0)
    model = mlp(sizes).eval()
    x = torch.randn(n, sizes[0])
    y = torch.randint(0, sizes[-1], (n,))
    return model, DataLoader(TensorDataset(x, y), batch_size=BATCH), x[:BATCH]


def has_curvkit_laplace() -> bool:
    return importlib.util.find_spec("curvkit.laplace") is not None


def make_laplace(method: str, model: nn.Module, structure: str):
    if method == "curvkit.laplace":
        from curvkit.laplace import Laplace

        return Laplace(
            model, "classification", subset_of_weights="all", hessian_structure=structure
        )
    from laplace import Laplace

    backend = None
    if method == "CurvkitGGN":
        from curvkit.compat.laplace import CurvkitGGN

        backend = CurvkitGGN
    return Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=structure,
        backend=backend,
    )


def methods() -> list[str]:
    found = ["laplace-torch (CurvlinopsGGN)", "CurvkitGGN"]
    return [*found, "curvkit.laplace"] if has_curvkit_laplace() else found


def fit_run(method: str, sizes: list[int], structure: str) -> Callable[[], object]:
    model, loader, _ = problem(sizes)

    def run() -> object:
        la = make_laplace(method, model, structure)
        la.fit(loader)
        return la

    return run


def predictive_run(method: str) -> Callable[[], object]:
    model, loader, x = problem([784, 256, 256, 10])
    la = make_laplace(method, model, "diag")
    la.fit(loader)

    def run() -> object:
        return la(x, pred_type="glm", link_approx="probit")

    return run


def time_round_robin(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_ > 0:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def memory_child(method: str) -> None:
    """One diagonal fit and GLM predictive at 10M parameters and 1000 classes; prints JSON."""
    sizes = [2048, 2048, 2048, 1000]
    model, _, _ = problem(sizes, n=8)
    x = torch.randn(8, sizes[0])
    loader = DataLoader(TensorDataset(x, torch.randint(0, 1000, (8,))), batch_size=8)
    num_params = sum(p.numel() for p in model.parameters())
    result: dict[str, object] = {"method": method, "params": num_params}
    start = time.perf_counter()
    try:
        if method == "CurvkitGGN":
            from laplace import Laplace

            from curvkit.compat.laplace import CurvkitGGN

            la = Laplace(
                model,
                "classification",
                subset_of_weights="all",
                hessian_structure="diag",
                backend=CurvkitGGN,
                backend_kwargs={"max_memory": 2**30},
            )
        else:
            from curvkit.laplace import Laplace

            la = Laplace(
                model,
                "classification",
                subset_of_weights="all",
                hessian_structure="diag",
                max_memory=2**30,
            )
        la.fit(loader)
        result["fit"] = "ok"
        la(x[:2], pred_type="glm", link_approx="probit")
        result["predictive"] = "ok"
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    result["seconds"] = time.perf_counter() - start
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                result["peak_rss_gib"] = int(line.split()[1]) / 2**20
    print(json.dumps(result))


def memory(method: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", method],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"method": method, "error": out.stderr[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-child")
    parser.add_argument("--only", choices=["time", "memory"])
    parser.add_argument("--cases", nargs="*", help="only the timed cases whose name has one")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    repeats = 1 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {repeats} round(s)")
    cases = {
        "fit diag, MLP 784-256-256-10": lambda m: fit_run(m, [784, 256, 256, 10], "diag"),
        "fit kron, MLP 784-256-256-10": lambda m: fit_run(m, [784, 256, 256, 10], "kron"),
        "fit full, MLP 64-64-10": lambda m: fit_run(m, [64, 64, 10], "full"),
        "GLM predictive (diag, 128 inputs)": predictive_run,
    }
    if args.only != "memory":
        for case, build in cases.items():
            if args.cases and not any(part in case for part in args.cases):
                continue
            timings = time_round_robin({m: build(m) for m in methods()}, repeats)
            base = timings[methods()[0]]
            for name, seconds in timings.items():
                print(f"{case:36s} {name:30s} {seconds:9.3f} s  {seconds / base:7.3f}x")
    if args.only != "time" and not args.quick:
        sizes = [2048, 2048, 2048, 1000]
        num_params = sum(a * b + b for a, b in itertools.pairwise(sizes))
        request = 8 * 1000 * num_params * 4
        print(
            f"laplace-torch's diagonal fit asks for a [8, 1000, {num_params}] Jacobian: "
            f"{request / 2**30:.0f} GiB (not run)"
        )
        for method in methods()[1:]:
            print(json.dumps(memory(method)))


if __name__ == "__main__":
    main()
