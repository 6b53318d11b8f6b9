"""A GPT language model as people write it: time as a multiple of a gradient, memory, peers.

The model is nanoGPT-style: token embeddings plus positions of ``arange(T)`` shared by all
sequences, the pre-norm blocks of ``bench_real_size.py`` (4-head causal attention written out in
``torch`` operations, a GELU MLP), a final LayerNorm and a head (``--tied``: the token embeddings
through ``F.linear``); next-token cross-entropy over all positions with the logits flattened to ``[N
T, V]``, as Hugging Face's loss code and curvlinops' examples do. Default size: vocabulary 8192,
width 256, 4 blocks, 8 sequences of 128 tokens (7.4M parameters), float32, CPU, eval mode.

Each (case, vocabulary) is timed and measured in fresh processes as in ``bench_real_size.py``:
time as the median of three calls over the median of three plain gradients
(``torch.autograd.grad`` of the loss) on the same model and batch, with glibc's default
allocator; peak extra memory in another process that returns freed memory to the system. The
peer is curvlinops' ``GGNLinearOperator @ v``.

Usage::

    python benchmarks/bench_transformers.py                  # the issue's table
    python benchmarks/bench_transformers.py --quick          # a smaller model, fewer cases
    python benchmarks/bench_transformers.py --vocabs 1024 4096 8192 --cases product
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_real_size import Block, measure, run_parts


class GPT(nn.Module):
    """nanoGPT-style: shared positions, optionally a tied head; logits flattened to [N T, V]."""

    def __init__(self, vocab: int, width: int, depth: int, length: int, tied: bool) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.blocks = nn.ModuleList(Block(width, 4) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = None if tied else nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        logits = F.linear(x, self.tokens.weight) if self.head is None else self.head(x)
        return logits.flatten(0, 1)


def problem(vocab: int, quick: bool, tied: bool) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    width, depth, length, sequences = (128, 2, 64, 8) if quick else (256, 4, 128, 8)
    model = GPT(vocab, width, depth, length, tied).eval()
    tokens = torch.randint(0, vocab, (sequences, length + 1))
    return model, nn.CrossEntropyLoss(), tokens[:, :-1], tokens[:, 1:].flatten()


def cases() -> dict[str, Callable[[nn.Module, nn.Module, Tensor, Tensor], object]]:
    def product(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> object:
        import curvkit

        vector = torch.ones(sum(p.numel() for p in model.parameters()))
        return curvkit.ggn_vector_product(model, loss_fn, (x, y), vector)

    def curvlinops_product(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> object:
        from curvlinops import GGNLinearOperator

        params = list(model.parameters())
        operator = GGNLinearOperator(
            model, loss_fn, params, [(x, y)], progressbar=False, check_deterministic=False
        )
        return operator @ torch.ones(operator.shape[1])

    def diag_mc(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> object:
        import curvkit

        return curvkit.diag_ggn(model, loss_fn, (x, y), mc_samples=1)

    def newton(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> object:
        import curvkit

        group = {"params": list(model.parameters()), "criterion": curvkit.top_k(10)}
        return curvkit.damped_newton_step(model, loss_fn, (x, y), [group], mc_samples=2)

    return {
        "product": product,
        "curvlinops-product": curvlinops_product,
        "diag-mc": diag_mc,
        "newton-top10-mc2": newton,
    }


def worker(case: str, vocab: int, quick: bool, tied: bool, part: str) -> dict[str, float]:
    model, loss_fn, x, y = problem(vocab, quick, tied)
    params = list(model.parameters())
    quantity = cases()[case]
    return measure(
        lambda: torch.autograd.grad(loss_fn(model(x), y), params),
        lambda: quantity(model, loss_fn, x, y),
        part,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="width 128, 2 blocks, 64 tokens")
    parser.add_argument("--tied", action="store_true", help="tie the head to the embeddings")
    parser.add_argument("--vocabs", type=int, nargs="*", default=[8192])
    parser.add_argument("--cases", nargs="*", default=list(cases()), choices=list(cases()))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        case, vocab = args.worker.rsplit(":", 1)
        print(json.dumps(worker(case, int(vocab), args.quick, args.tied, args.part)))
        return
    size = "quick" if args.quick else "full"
    print(f"torch {torch.__version__}, {args.threads} threads, CPU, float32, {size} size")
    print(
        "| case | vocab | tied | gradient [ms] | time [ms] | x gradient | gradient peak MiB "
        "| peak extra MiB |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for vocab in args.vocabs:
        for case in args.cases:
            command = [
                sys.executable,
                __file__,
                "--worker",
                f"{case}:{vocab}",
                "--threads",
                str(args.threads),
                *(["--quick"] if args.quick else []),
                *(["--tied"] if args.tied else []),
            ]
            try:
                row = run_parts(command, dict(os.environ))
            except RuntimeError as error:
                print(
                    f"| {case} | {vocab} | {args.tied} | failed: "
                    f"{str(error).splitlines()[-1][:120]} |||||",
                    flush=True,
                )
                continue
            print(
                f"| {case} | {vocab} | {args.tied} | {row['gradient_ms']:.0f} | {row['ms']:.0f} "
                f"| {row['x_gradient']:.2f} | {row['gradient_peak_mib']:.0f} "
                f"| {row['peak_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
