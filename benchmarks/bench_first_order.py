"""Hessian and first-order quantities: curvkit against curvlinops, BackPACK and torch.func.

Run ``python benchmarks/bench_first_order.py`` (``--quick`` for fewer rounds, ``--resnet`` to add
ResNet-18 on CIFAR-sized inputs, ``--threads 1`` for fair CPU times on a shared machine).

Pairs, each on the MLP 784-256-128-10 with tanh (N = 128, float32):

- Hessian-vector product: :func:`curvkit.hessian_vector_product` vs curvlinops'
  ``HessianLinearOperator @ v`` (the operator built outside the timing);
- empirical Fisher diagonal: :func:`curvkit.diag_ef` vs BackPACK's ``SumGradSquared``;
- per-sample gradients: :func:`curvkit.batch_gradients` vs BackPACK's ``BatchGrad`` and
  ``torch.func.vmap(torch.func.grad(...))``;
- exact Hessian diagonal: :func:`curvkit.diag_hessian` vs BackPACK's ``DiagHessian``.

With ``--resnet``, ResNet-18 (N = 32, 32x32 inputs, eval mode) adds the Hessian-vector product
against curvlinops (BackPACK does not take the residual graph). Every BackPACK call includes its
forward and backward pass, as it needs them; so does every curvkit call. Timing: the methods of
a pair run round-robin after a warm-up round; the medians of the process CPU time and of the
wall-clock time are shown, and the ratio peer / curvkit of the CPU times (above 1: curvkit is
faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import curvkit

sys.path.insert(0, str(Path(__file__).parent))
from bench_real_size import resnet18

# BackPACK's module hooks make torch warn about full backward hooks on inputs that need no
# gradient, and curvlinops' forward-mode products make torch warn that torch.jit.script is
# deprecated: the peers' notices, not findings of this benchmark.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")


def mlp_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 128), nn.Tanh(), nn.Linear(128, 10)
    )
    return model.eval(), nn.CrossEntropyLoss(), torch.randn(128, 784), torch.randint(10, (128,))


def resnet_problem() -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = resnet18().eval()
    return model, nn.CrossEntropyLoss(), torch.randn(32, 3, 32, 32), torch.randint(10, (32,))


def backpack_call(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, extension: str):
    from backpack import backpack, extend, extensions

    model, loss_fn = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
    attribute = {
        "SumGradSquared": "sum_grad_squared",
        "BatchGrad": "grad_batch",
        "DiagHessian": "diag_h",
    }[extension]

    def call() -> list[Tensor]:
        loss = loss_fn(model(x), y)
        with backpack(getattr(extensions, extension)()):
            loss.backward()
        result = [getattr(p, attribute) for p in model.parameters()]
        for p in model.parameters():
            p.grad = None
            delattr(p, attribute)
        return result

    return call


def vmap_grad_call(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def sample_loss(values: dict, xn: Tensor, yn: Tensor) -> Tensor:
        return loss_fn(torch.func.functional_call(model, values, (xn[None],)), yn[None])

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
    # BatchGrad's scale: the gradients of the batch loss (mean: per-sample loss / N).
    return lambda: [g / len(x) for g in per_sample(params, x, y).values()]


def curvlinops_hvp(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, v: Tensor):
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    operator = HessianLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
    return lambda: operator @ v


def timed(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds of each call, run round-robin after one warm-up round."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for round_index in range(rounds + 1):
        for name, call in calls.items():
            cpu, wall = time.process_time(), time.perf_counter()
            call()
            if round_index:
                samples[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {
        name: (statistics.median(c for c, _ in s), statistics.median(w for _, w in s))
        for name, s in samples.items()
    }


def pairs(problem: str) -> dict[str, dict[str, Callable[[], object]]]:
    model, loss_fn, x, y = mlp_problem() if problem == "mlp" else resnet_problem()
    batch = (x, y)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    out: dict[str, dict[str, Callable[[], object]]] = {
        "Hessian-vector product": {
            "curvkit": lambda: curvkit.hessian_vector_product(model, loss_fn, batch, v),
            "curvlinops HessianLinearOperator @ v": curvlinops_hvp(model, loss_fn, x, y, v),
        }
    }
    if problem != "mlp":
        return out
    out["diag_ef"] = {
        "curvkit": lambda: curvkit.diag_ef(model, loss_fn, batch),
        "BackPACK SumGradSquared": backpack_call(model, loss_fn, x, y, "SumGradSquared"),
    }
    out["batch_gradients"] = {
        "curvkit": lambda: curvkit.batch_gradients(model, loss_fn, batch),
        "BackPACK BatchGrad": backpack_call(model, loss_fn, x, y, "BatchGrad"),
        "torch.func vmap(grad)": vmap_grad_call(model, loss_fn, x, y),
    }
    out["diag_hessian (tanh)"] = {
        "curvkit": lambda: curvkit.diag_hessian(model, loss_fn, batch),
        "BackPACK DiagHessian": backpack_call(model, loss_fn, x, y, "DiagHessian"),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--resnet", action="store_true", help="add ResNet-18 (N 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 7
    problems = ["mlp", "resnet18"] if args.resnet else ["mlp"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
    for problem in problems:
        print(f"\n## {problem}\n")
        print(f"| {'quantity':<24} | {'method':<38} | CPU ms | wall ms | peer / curvkit (CPU) |")
        print(f"|{'-' * 26}|{'-' * 40}|-------:|--------:|---------------------:|")
        for quantity, calls in pairs(problem).items():
            times = timed(calls, rounds)
            ours = times["curvkit"][0]
            for name, (cpu, wall) in times.items():
                ratio = "" if name == "curvkit" else f"{cpu / ours:.2f}"
                print(
                    f"| {quantity:<24} | {name:<38} | {1e3 * cpu:6.1f} | {1e3 * wall:7.1f} "
                    f"| {ratio:>20} |"
                )


if __name__ == "__main__":
    main()
