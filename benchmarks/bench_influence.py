"""Influence functions: curvkit.influence against kronfluence 1.0.1, in one run.

Pairwise scores (``--only mlp cnn``): 1000 training and 100 query examples, EK-FAC with one
sampled label per example on both sides (curvkit's ``fisher_type="mc"``, kronfluence's
``use_empirical_fisher=False`` with a task that samples), the heuristic damping on both sides
(curvkit's ``damping=None``, kronfluence's ``damping_factor=None``), float32, batches of 100.
Each timed call starts from nothing: curvkit's ``pairwise_scores`` fits its factors, and
kronfluence's ``fit_all_factors`` (covariances, eigendecomposition, eigenvalue correction, each
written to disk as it does) is followed by ``compute_pairwise_scores``. The models: an MLP
784-256-256-10 (ReLU) and a small CNN (3x3 convolutions of 16 and 32 channels, each followed by
ReLU and 2x2 max-pooling, and a linear head) on 32x32 RGB inputs, with random inputs and labels.

Timing as in ``bench_kfac.py``: the two methods run round-robin after two warm-up rounds;
medians of process CPU time and wall-clock time; the ratio is curvkit's CPU time over
kronfluence's. Peak extra memory: one fresh subprocess per (problem, method), glibc returning
freed memory (``MALLOC_MMAP_THRESHOLD_=65536``), ``VmHWM - VmRSS`` of one call after a warm-up
(Linux only). Each problem also reports how far the two libraries' scores are apart with the
empirical Fisher (no sampling, so the same numbers are expected up to float32 rounding).

Self-influence (``--only lm``): ``self_scores`` of ``--lm-examples`` sequences (default 10000)
of 128 tokens on the GPT-style language model of ``bench_real_size.py`` (vocabulary 8192,
width 256, 4 blocks; every parameter, embeddings and LayerNorms included) under
``max_memory=4 GiB``, in a fresh process: wall and CPU time, peak resident memory (``VmHWM``).

Usage::

    python benchmarks/bench_influence.py --only mlp cnn       # the pairwise table
    python benchmarks/bench_influence.py --only lm --lm-examples 500
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kfac import _status_kib, time_round_robin
from bench_real_size import LanguageModel

from curvkit import influence

# kronfluence constructs CUDA gradient scalers and autocast contexts even on the CPU.
warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
warnings.filterwarnings("ignore", message=".*GradScaler is enabled, but CUDA is not available")

NUM_TRAIN, NUM_QUERY, BATCH_SIZE = 1000, 100, 100
LM_VOCAB, LM_WIDTH, LM_DEPTH, LM_LENGTH, LM_BATCH = 8192, 256, 4, 128, 8
LM_BUDGET = 4 * 2**30

Problem = tuple[nn.Module, nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]


def make_problem(name: str) -> Problem:
    """The model, the loss (mean), the training set and the queries of a problem."""
    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        shape: tuple[int, ...] = (784,)
    elif name == "cnn":
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
        shape = (3, 32, 32)
    else:
        raise KeyError(name)
    inputs = torch.randn(NUM_TRAIN + NUM_QUERY, *shape)
    targets = torch.randint(0, 10, (NUM_TRAIN + NUM_QUERY,))
    train = (inputs[:NUM_TRAIN], targets[:NUM_TRAIN])
    query = (inputs[NUM_TRAIN:], targets[NUM_TRAIN:])
    return model.eval(), nn.CrossEntropyLoss(), train, query


def batches(data: tuple[Tensor, Tensor], size: int) -> list[tuple[Tensor, Tensor]]:
    inputs, targets = data
    return [(inputs[i : i + size], targets[i : i + size]) for i in range(0, len(targets), size)]


# ---------------------------------------------------------------------------------------------
# the two libraries: each builds a zero-argument callable (set-up outside the timing)


def curvkit_pairwise(problem: Problem, fisher_type: str = "mc") -> Callable[[], Tensor]:
    model, loss_fn, train, query = problem
    train_batches = batches(train, BATCH_SIZE)

    def run() -> Tensor:
        return influence.pairwise_scores(
            model,
            loss_fn,
            train_batches,
            query,
            curvature="ekfac",
            fisher_type=fisher_type,
            generator=torch.Generator().manual_seed(0),
            progress=False,
        )

    return run


def kronfluence_pairwise(problem: Problem, fisher_type: str = "mc") -> Callable[[], Tensor]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    model, _, (train_x, train_y), (query_x, query_y) = problem

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(logits.softmax(dim=-1), 1).flatten()
            return nn.functional.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, targets = batch
            return nn.functional.cross_entropy(model(inputs), targets, reduction="sum")

    task = Classification()
    output_dir = tempfile.mkdtemp(prefix="bench_influence_")
    analyzer = Analyzer(
        "bench",
        prepare_model(copy.deepcopy(model), task),
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=output_dir,
        log_level=logging.WARNING,
    )
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=fisher_type == "empirical")
    score_args = ScoreArguments(damping_factor=None)
    train_set, query_set = TensorDataset(train_x, train_y), TensorDataset(query_x, query_y)

    def run() -> Tensor:
        analyzer.fit_all_factors(
            "factors",
            train_set,
            per_device_batch_size=BATCH_SIZE,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            "scores",
            "factors",
            query_set,
            train_set,
            per_device_query_batch_size=NUM_QUERY,
            per_device_train_batch_size=BATCH_SIZE,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("scores")["all_modules"]

    return run


METHODS: dict[str, Callable[[Problem], Callable[[], Tensor]]] = {
    "curvkit": curvkit_pairwise,
    "kronfluence": kronfluence_pairwise,
}


def agreement(problem: Problem) -> float:
    """Largest difference of the two libraries' empirical-Fisher scores over the largest score."""
    ours = curvkit_pairwise(problem, "empirical")()
    theirs = kronfluence_pairwise(problem, "empirical")()
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


# ---------------------------------------------------------------------------------------------
# memory: one fresh process per measurement


def _trimmed_rss_kib() -> int:
    """Resident memory after returning freed memory, with the high-water mark reset to it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS")


def memory_child(problem_name: str, method: str) -> None:
    """In the subprocess: print the peak extra resident memory (KiB) of one call."""
    run = METHODS[method](make_problem(problem_name))
    run()
    before = _trimmed_rss_kib()
    result = run()
    peak = _status_kib("VmHWM")
    del result
    print(json.dumps({"extra_kib": peak - before}))


def in_subprocess(arguments: list[str], threads: int) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, "--threads", str(threads), *arguments]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode:
        raise RuntimeError(result.stderr.strip()[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# self-influence on a language model


def lm_batches(num_examples: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Random token sequences, drawn batch by batch, the same on every pass."""
    generator = torch.Generator().manual_seed(1)
    for start in range(0, num_examples, LM_BATCH):
        size = min(LM_BATCH, num_examples - start)
        tokens = torch.randint(0, LM_VOCAB, (size, LM_LENGTH + 1), generator=generator)
        yield tokens[:, :-1], tokens[:, 1:]


class Replayable:
    """An iterable that draws :func:`lm_batches` afresh on every pass (no list in memory)."""

    def __init__(self, num_examples: int) -> None:
        self.num_examples = num_examples

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return lm_batches(self.num_examples)


def lm_child(num_examples: int, progress: bool) -> None:
    """In the subprocess: time and peak memory of ``self_scores`` on the language model."""
    torch.manual_seed(0)
    model = LanguageModel(LM_VOCAB, LM_WIDTH, LM_DEPTH, LM_LENGTH).eval()
    before = _trimmed_rss_kib()
    wall, cpu = time.perf_counter(), time.process_time()
    scores = influence.self_scores(
        model,
        nn.CrossEntropyLoss(),
        Replayable(num_examples),
        max_memory=LM_BUDGET,
        generator=torch.Generator().manual_seed(0),
        progress=progress,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert scores.shape == (num_examples,) and bool(torch.isfinite(scores).all())
    print(
        json.dumps(
            {
                "examples": num_examples,
                "parameters": sum(p.numel() for p in model.parameters()),
                "wall_s": wall,
                "cpu_s": cpu,
                "rss_before_mib": before / 1024,
                "peak_rss_mib": _status_kib("VmHWM") / 1024,
            }
        )
    )


# ---------------------------------------------------------------------------------------------


def pairwise_table(problems: list[str], repeats: int, threads: int, memory: bool) -> None:
    print(f"{'problem':8} {'method':12} {'wall s':>8} {'cpu s':>8} {'ratio':>6} {'peak MiB':>9}")
    for name in problems:
        problem = make_problem(name)
        runs = {method: build(problem) for method, build in METHODS.items()}
        timings = time_round_robin(runs, repeats)
        ratio = timings["curvkit"][1] / timings["kronfluence"][1]
        for method, (wall, cpu) in timings.items():
            peak = ""
            if memory:
                child = in_subprocess(["--memory-child", name, method], threads)
                peak = f"{child['extra_kib'] / 1024:9.1f}"
            shown = f"{ratio:6.2f}" if method == "curvkit" else ""
            print(f"{name:8} {method:12} {wall:8.2f} {cpu:8.2f} {shown:>6} {peak}", flush=True)
        print(f"{name:8} empirical-Fisher scores differ by {agreement(problem):.1e} (relative)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=["mlp", "cnn", "lm"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--lm-examples", type=int, default=10_000)
    parser.add_argument("--progress", action="store_true", help="progress bars in the LM run")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--lm-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.lm_child:
        lm_child(args.lm_examples, args.progress)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats")
    pairwise = [name for name in args.only if name != "lm"]
    if pairwise:
        pairwise_table(pairwise, args.repeats, args.threads, not args.no_memory)
    if "lm" in args.only:
        child = ["--lm-child", "--lm-examples", str(args.lm_examples)]
        row = in_subprocess(child + (["--progress"] if args.progress else []), args.threads)
        print(f"LM self-influence under {LM_BUDGET / 2**30:.0f} GiB: {json.dumps(row)}")


if __name__ == "__main__":
    main()
