"""Real size: a GPT-style language model and ResNet-18, time as a multiple of a gradient, memory.

Each (case, checkout) runs in two fresh processes. In the first, with glibc's default allocator,
after a warm-up call the median of three calls is divided by the median of three plain gradients
(``torch.autograd.grad`` of the loss) on the same model and batch. In the second, the peak extra
memory is the peak resident set size during one call minus the resident size before it
(``VmHWM - VmRSS`` after ``/proc/self/clear_refs``, Linux only), with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set. That setting makes
every tensor above 64 KiB fresh memory faulted in anew, which slows down a call by how much it
allocates rather than by what it computes, so it stays out of the timing process.

Models (float32, CPU, eval mode): a GPT-style language model (vocabulary 4096, width 128, 2
pre-norm blocks of 4-head causal attention written out in ``torch`` operations, learned positions
indexed per sample), 8 sequences of 64 tokens, next-token cross-entropy over all positions;
ResNet-18 (CIFAR stem, BatchNorm in eval mode), 32 images 3x32x32, 10 classes.

Usage::

    python benchmarks/bench_real_size.py                      # the curvkit on sys.path
    python benchmarks/bench_real_size.py --quick              # the Monte-Carlo cases only
    python benchmarks/bench_real_size.py --checkouts before=/path/a after=/path/b
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """Pre-norm transformer block with causal multi-head attention and a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = (
            z.reshape(n, t, self.heads, -1).transpose(1, 2)
            for z in self.qkv(self.ln1(x)).split(d, dim=2)
        )
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        attention = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class LanguageModel(nn.Module):
    """GPT-style model returning logits ``[N, V, T]`` (the layout CrossEntropyLoss expects)."""

    def __init__(self, vocab: int = 4096, width: int = 128, depth: int = 2, length: int = 64):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList(Block(width, 4) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        x = self.tokens(tokens) + self.positions(torch.arange(t).expand(n, t))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)).transpose(1, 2)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


def resnet18(classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def problem(case: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    if case.startswith("lm"):
        tokens = torch.randint(0, 4096, (8, 65))
        return LanguageModel().eval(), nn.CrossEntropyLoss(), tokens[:, :-1], tokens[:, 1:]
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    return resnet18().eval(), nn.CrossEntropyLoss(), images, labels


def cases() -> dict[str, Callable[[nn.Module, nn.Module, Tensor, Tensor], object]]:
    import curvkit

    def newton(mc_samples: int) -> Callable[[nn.Module, nn.Module, Tensor, Tensor], object]:
        def step(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> object:
            group = {"params": list(model.parameters()), "criterion": curvkit.top_k(10)}
            return curvkit.damped_newton_step(
                model, loss_fn, (x, y), [group], mc_samples=mc_samples
            )

        return step

    def product(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> object:
        vector = torch.ones(sum(p.numel() for p in model.parameters()))
        return curvkit.ggn_vector_product(model, loss_fn, (x, y), vector)

    return {
        "lm-diag-mc": lambda m, loss, x, y: curvkit.diag_ggn(m, loss, (x, y), mc_samples=1),
        "lm-newton-mc": newton(1),
        "lm-newton-mc2": newton(2),
        "resnet18-diag-mc": lambda m, loss, x, y: curvkit.diag_ggn(m, loss, (x, y), mc_samples=1),
        "resnet18-ggn-vector-product": product,
        "resnet18-newton-mc": newton(1),
        "resnet18-diag-exact": lambda m, loss, x, y: curvkit.diag_ggn(m, loss, (x, y)),
        "resnet18-newton-exact": newton(0),
    }


QUICK = ("lm-diag-mc", "resnet18-diag-mc")


def _memory(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _median_seconds(call: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_mib(call: Callable[[], object]) -> float:
    """The peak resident memory of one call above the resident size before it, in MiB."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _memory("VmRSS")
    result = call()
    peak = _memory("VmHWM") - before
    del result
    return peak


#: The parts of a measurement, each in its own process, and the environment each adds.
PARTS = {"time": {}, "memory": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def measure(
    gradient: Callable[[], object], call: Callable[[], object], part: str
) -> dict[str, float]:
    """``part`` ``"time"``: after a warm-up, the median of three as a multiple of a gradient's;
    ``"memory"``: the peak extra memory of one call and of one gradient."""
    gradient()
    call()
    if part == "memory":
        return {"gradient_peak_mib": peak_extra_mib(gradient), "peak_mib": peak_extra_mib(call)}
    gradient_seconds = _median_seconds(gradient)
    seconds = _median_seconds(call)
    return {
        "gradient_ms": 1e3 * gradient_seconds,
        "ms": 1e3 * seconds,
        "x_gradient": seconds / gradient_seconds,
    }


def run_parts(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run a worker ``command`` once per part of :data:`PARTS` and merge their results.

    Raises:
        RuntimeError: With the worker's last line of error output, if it fails.
    """
    row: dict[str, float] = {}
    base = {k: v for k, v in env.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    for part, extra in PARTS.items():
        result = subprocess.run(
            [*command, "--part", part],
            env={**base, **extra},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(result.stderr.strip()[-3000:])
        row |= json.loads(result.stdout.strip().splitlines()[-1])
    return row


def worker(case: str, part: str) -> dict[str, float]:
    model, loss_fn, x, y = problem(case)
    params = list(model.parameters())
    quantity = cases()[case]
    return measure(
        lambda: torch.autograd.grad(loss_fn(model(x), y), params),
        lambda: quantity(model, loss_fn, x, y),
        part,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--cases", nargs="*", help="run these cases only (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument(
        "--checkouts",
        nargs="*",
        default=[],
        metavar="LABEL=PATH",
        help="compare curvkit source checkouts (put on PYTHONPATH); default: the installed one",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.part)))
        return
    checkouts = [tuple(c.split("=", 1)) for c in args.checkouts] or [("curvkit", "")]
    print(f"torch {torch.__version__}, {args.threads} threads, CPU, float32")
    print("| case | curvkit | gradient [ms] | time [ms] | x gradient | peak extra MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for case in args.cases or (QUICK if args.quick else cases()):
        for label, path in checkouts:
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = path
            command = [sys.executable, __file__, "--worker", case, "--threads", str(args.threads)]
            try:
                row = run_parts(command, env)
            except RuntimeError as error:
                raise SystemExit(f"{case} on {label} failed:\n{error}") from None
            print(
                f"| {case} | {label} | {row['gradient_ms']:.0f} | {row['ms']:.0f} | "
                f"{row['x_gradient']:.1f} | {row['peak_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
