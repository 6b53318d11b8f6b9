"""``curvkit demo``: curvature of a small MLP on handwritten digits, checked against autograd.

The demo

1. computes the exact GGN diagonal over the training set and the GGN spectrum of a batch;
2. checks the diagonal, some GGN columns, the top eigenvalues and one directionally damped Newton
   step against dense references built from plain autograd (:mod:`curvkit.testing.verify`);
3. trains the MLP with damped Newton steps along the top GGN eigendirections
   (:class:`curvkit.optim.DampedNewton`) and, from the same initialisation, with Adam;
4. prints a report with timings and writes figures and ``report.json`` into ``--out``.

The exit code is 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import curvkit
from curvkit.cli import calibration, figures
from curvkit.cli._common import (
    CommandError,
    add_torch_options,
    apply_torch_options,
    format_table,
    positive_int,
    stopwatch,
)
from curvkit.optim import DampedNewton
from curvkit.quantities.directional import damped_newton_step, ggn_eigh, top_k
from curvkit.quantities.ggn import diag_ggn, ggn_columns
from curvkit.testing import verify

#: Relative tolerance of the checks (error relative to the largest reference entry) per dtype.
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4}
BATCH_SIZE = 64
#: Hidden units per layer: 1482 parameters keep the dense reference GGN's eigh to a second.
HIDDEN = 16
#: Damped Newton directions per step and their damping. With fewer directions training stalls
#: (the step ignores the rest of the gradient); with damping 0.1 or less it diverged on digits
#: after a few epochs; 0.3 trains stably over seeds in our runs.
NUM_DIRECTIONS = 50
DAMPING = 0.3
NUM_COLUMNS = 16
ADAM_LR = 1e-2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``curvkit demo`` to its parser."""
    add_torch_options(parser, default_dtype="float64")
    parser.add_argument(
        "--epochs", type=positive_int, default=5, help="training epochs (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--data",
        choices=("digits", "synthetic"),
        default="digits",
        help="scikit-learn's handwritten digits, or a synthetic 10-class problem of the same "
        "shape that needs no scikit-learn (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("curvkit-demo"),
        help="directory for the figures and report.json (default: ./%(default)s)",
    )
    parser.add_argument(
        "--no-figures", action="store_true", help="write no figures (no matplotlib needed)"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars while training"
    )


@dataclass
class Dataset:
    """A classification problem split into training and test sets."""

    name: str
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    num_classes: int

    def batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield shuffled training batches (the last one may be smaller).

        Args:
            batch_size: Samples per batch.
            generator: The shuffling's random state (on the CPU).

        Yields:
            ``(inputs, targets)`` pairs.
        """
        order = torch.randperm(len(self.train_targets), generator=generator)
        order = order.to(self.train_targets.device)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield self.train_inputs[chosen], self.train_targets[chosen]


def load_dataset(kind: str, seed: int, device: torch.device, dtype: torch.dtype) -> Dataset:
    """Load the digits (or make the synthetic problem) and split it 80/20.

    Args:
        kind: ``"digits"`` or ``"synthetic"``.
        seed: Seed of the split and of the synthetic data.
        device: Where the tensors go.
        dtype: The inputs' dtype.

    Returns:
        The dataset, inputs scaled to ``[0, 1]``.

    Raises:
        CommandError: If scikit-learn is needed and missing.
    """
    generator = torch.Generator().manual_seed(seed)
    if kind == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise CommandError(
                "--data digits needs scikit-learn: pip install 'curvkit[demo]', "
                "or run with --data synthetic"
            ) from error
        images, labels = load_digits(return_X_y=True)
        inputs = torch.as_tensor(images, dtype=torch.float64) / 16.0
        targets = torch.as_tensor(labels, dtype=torch.long)
        name = "handwritten digits (scikit-learn, 8x8 images, 10 classes)"
    else:
        inputs, targets = _synthetic_digits(generator)
        name = "synthetic 10-class problem (64 features)"
    order = torch.randperm(len(targets), generator=generator)
    num_train = int(0.8 * len(targets))
    train, test = order[:num_train], order[num_train:]

    def put(tensor: Tensor, cast: bool) -> Tensor:
        return tensor.to(device=device, dtype=dtype if cast else tensor.dtype)

    return Dataset(
        name=name,
        train_inputs=put(inputs[train], True),
        train_targets=put(targets[train], False),
        test_inputs=put(inputs[test], True),
        test_targets=put(targets[test], False),
        num_classes=10,
    )


def _synthetic_digits(generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """1797 noisy copies of 10 random 8x8 'glyphs': learnable, but not in one step."""
    num_samples, num_classes, num_features = 1797, 10, 64
    glyphs = (torch.rand(num_classes, num_features, generator=generator) < 0.35).double()
    targets = torch.randint(num_classes, (num_samples,), generator=generator)
    noise = 0.9 * torch.randn(num_samples, num_features, generator=generator, dtype=torch.float64)
    return (glyphs[targets] + noise).clamp(0, 1), targets


def build_model(num_features: int, num_classes: int, seed: int) -> nn.Sequential:
    """The MLP of the demo: two tanh hidden layers of :data:`HIDDEN` units.

    Args:
        num_features: Input features.
        num_classes: Output logits.
        seed: Seed of the initialisation.

    Returns:
        The model (float32, CPU; move it as needed).
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(num_features, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, num_classes),
    )


@dataclass
class Check:
    """One comparison of a curvkit result with its autograd reference."""

    quantity: str
    max_rel_error: float
    tolerance: float
    passed: bool


def run(args: argparse.Namespace) -> int:
    """Run ``curvkit demo`` with its parsed options; the exit code is 1 if a check failed."""
    device, dtype = apply_torch_options(args)
    if not args.no_figures:
        figures.require_matplotlib()
    start = time.perf_counter()
    dataset = load_dataset(args.data, args.seed, device, dtype)
    model = build_model(dataset.train_inputs.shape[1], dataset.num_classes, args.seed)
    model = model.to(device=device, dtype=dtype)
    loss_fn = nn.CrossEntropyLoss()
    names = [name for name, _ in model.named_parameters()]
    num_params = sum(p.numel() for p in model.parameters())
    architecture = (
        f"MLP {dataset.train_inputs.shape[1]}-{HIDDEN}-{HIDDEN}-{dataset.num_classes} (tanh)"
    )
    print(
        f"curvkit {curvkit.__version__} demo | torch {torch.__version__} | {device} {args.dtype}"
        f" | {args.threads} thread(s)\n"
        f"data:  {dataset.name}: {len(dataset.train_targets)} training and "
        f"{len(dataset.test_targets)} test samples\n"
        f"model: {architecture}, {num_params} parameters; cross-entropy loss (mean)",
        flush=True,
    )

    timings: dict[str, float] = {}
    train_batches = list(dataset.batches(BATCH_SIZE, torch.Generator().manual_seed(args.seed)))
    batch = train_batches[0]
    # The first calls pay one-off costs (kernel and torch.func set-up): shown apart from the rest.
    with stopwatch(timings, "warm-up: first gradient and diag_ggn calls", device):
        _gradient(model, loss_fn, batch)
        diag_ggn(model, loss_fn, batch)
    with stopwatch(timings, "gradient, one batch (for scale)", device):
        _gradient(model, loss_fn, batch)
    with stopwatch(timings, "diag_ggn, whole training set", device):
        diagonal = diag_ggn(model, loss_fn, train_batches, progress=False)
    with stopwatch(timings, "ggn_eigh, one batch, full spectrum", device):
        initial_spectrum = _spectrum(model, loss_fn, batch)

    checks = _check_against_autograd(model, loss_fn, batch, TOLERANCES[dtype], timings, device)
    trained, histories = _train_both(model, loss_fn, dataset, args, timings)
    final_spectrum = _spectrum(trained["damped Newton"], loss_fn, batch)
    calibration = _calibrate(trained, dataset, timings, device)
    checks += _check_laplace(calibration, trained, dataset, TOLERANCES[dtype])

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    if not args.no_figures:
        spectra = {"at initialisation": initial_spectrum, "after damped Newton": final_spectrum}
        written = _write_figures(args.out, names, diagonal, spectra, histories, calibration)
    report = _report(args, device, dataset, architecture, num_params, checks, timings)
    report.update(
        {
            "ggn_diagonal": {
                name: {"min": d.min().item(), "median": d.median().item(), "max": d.max().item()}
                for name, d in zip(names, diagonal, strict=True)
            },
            "ggn_eigenvalues": {
                "batch_size": len(batch[1]),
                "largest_at_initialisation": initial_spectrum.flip(0)[:50].tolist(),
                "largest_after_damped_newton": final_spectrum.flip(0)[:50].tolist(),
            },
            "training": histories,
            "calibration": {
                name: {key: value for key, value in result.items() if key != "la"}
                for name, result in calibration.items()
            },
            "figures": written,
            "seconds_total": time.perf_counter() - start,
        }
    )
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_summary(report, checks, timings, histories, dtype)
    print(f"\nwrote {', '.join(str(args.out / f) for f in ['report.json', *written])}")
    if not report["all_checks_passed"]:
        print("FAILED: a curvkit result differs from its autograd reference", file=sys.stderr)
        return 1
    return 0


def _report(
    args: argparse.Namespace,
    device: torch.device,
    dataset: Dataset,
    architecture: str,
    num_params: int,
    checks: list[Check],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The report's fixed part: versions, options, data, model, checks and settings."""
    return {
        "curvkit": curvkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "options": {
            "device": str(device),
            "dtype": args.dtype,
            "epochs": args.epochs,
            "seed": args.seed,
            "data": args.data,
            "threads": args.threads,
        },
        "data": {
            "name": dataset.name,
            "train_samples": len(dataset.train_targets),
            "test_samples": len(dataset.test_targets),
        },
        "model": {"architecture": architecture, "parameters": num_params},
        "checks": [vars(check) for check in checks],
        "all_checks_passed": all(check.passed for check in checks),
        "timings_s": timings,
        "damped_newton": {"directions": NUM_DIRECTIONS, "damping": DAMPING},
        "adam": {"lr": ADAM_LR},
        "batch_size": BATCH_SIZE,
    }


def _train_both(
    model: nn.Module,
    loss_fn: nn.Module,
    dataset: Dataset,
    args: argparse.Namespace,
    timings: dict[str, float],
) -> tuple[dict[str, nn.Module], dict[str, dict[str, list[float]]]]:
    """Train a copy of the model with damped Newton steps and one with Adam."""
    histories = {}
    trained = {}
    for name, make_step in (("damped Newton", _damped_newton), ("Adam", _adam)):
        trained[name] = copy.deepcopy(model)  # both start from the same initialisation
        step = make_step(trained[name], loss_fn)
        histories[name] = train(trained[name], loss_fn, dataset, step, args, name)
        timings[f"train with {name}, {args.epochs} epochs"] = histories[name]["seconds"][-1]
    return trained, histories


def _calibrate(
    trained: dict[str, nn.Module], dataset: Dataset, timings: dict[str, float], device: torch.device
) -> dict[str, dict[str, Any]]:
    """A post-hoc Laplace approximation of each trained model (:mod:`curvkit.cli.calibration`)."""
    test_sets = {
        "test": (dataset.test_inputs, dataset.test_targets),
        "shifted": (calibration.shift_one_pixel(dataset.test_inputs), dataset.test_targets),
    }
    results = {}
    for name, model in trained.items():
        with stopwatch(timings, f"Laplace (fit, prior precision, predictive), {name}", device):
            results[name] = calibration.laplace_calibration(
                model, dataset.train_inputs, dataset.train_targets, test_sets, BATCH_SIZE
            )
    return results


def _check_laplace(
    results: dict[str, dict[str, Any]],
    trained: dict[str, nn.Module],
    dataset: Dataset,
    tolerance: float,
) -> list[Check]:
    """Compare the damped Newton model's Laplace exact block and predictive with autograd."""
    la, model = results["damped Newton"]["la"], trained["damped Newton"]
    train_set = (dataset.train_inputs, dataset.train_targets)
    triples = calibration.laplace_references(la, model, train_set, dataset.test_inputs)
    return [_check(name, actual, expected, tolerance) for name, actual, expected in triples]


def _gradient(model: nn.Module, loss_fn: nn.Module, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
    inputs, targets = batch
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss_fn(model(inputs), targets), params))


def _spectrum(model: nn.Module, loss_fn: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """All eigenvalues of the batch GGN (ascending), through the Gram matrix."""
    seen: dict[str, Tensor] = {}

    def keep_largest(evals: Tensor) -> list[int]:
        # The criterion sees every Gram eigenvalue; only the eigenvectors it picks are formed.
        seen["evals"] = evals.detach().clone()
        return [evals.numel() - 1]

    group = {"params": list(model.parameters()), "criterion": keep_largest}
    ggn_eigh(model, loss_fn, batch, [group])
    return seen["evals"].cpu()


def _check_against_autograd(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: tuple[Tensor, Tensor],
    tolerance: float,
    timings: dict[str, float],
    device: torch.device,
) -> list[Check]:
    """Compare diagonal, columns, eigenvalues and a damped Newton step with dense references."""
    inputs, targets = batch
    params = list(model.parameters())
    with stopwatch(timings, "reference: dense GGN by autograd", device):
        ggn = verify.reference_ggn(model, loss_fn, inputs, targets)
    with stopwatch(timings, "reference: eigh of the dense GGN", device):
        ref_evals, ref_evecs = torch.linalg.eigh(ggn)

    with stopwatch(timings, "diag_ggn, one batch", device):
        diagonal = diag_ggn(model, loss_fn, batch)
    indices = torch.linspace(0, ggn.shape[0] - 1, NUM_COLUMNS).round().long().tolist()
    with stopwatch(timings, f"ggn_columns, {NUM_COLUMNS} columns", device):
        columns = dict(ggn_columns(model, loss_fn, batch, indices=indices))
    group = {"params": params, "criterion": top_k(NUM_DIRECTIONS), "damping": DAMPING}
    with stopwatch(timings, f"ggn_eigh, top {NUM_DIRECTIONS}", device):
        [(evals, _)] = ggn_eigh(model, loss_fn, batch, [group])
    with stopwatch(timings, f"damped_newton_step, top {NUM_DIRECTIONS}", device):
        [step] = damped_newton_step(model, loss_fn, batch, [group])

    # The reference step: Newton along the top eigenvectors of the dense GGN, damped.
    gradient = _flat(_gradient(model, loss_fn, batch))
    top_evals, top_evecs = ref_evals[-NUM_DIRECTIONS:], ref_evecs[:, -NUM_DIRECTIONS:]
    ref_step = top_evecs @ (-(top_evecs.T @ gradient) / (top_evals + DAMPING))

    pairs = [
        ("GGN diagonal", _flat(diagonal), ggn.diagonal()),
        (
            f"{NUM_COLUMNS} GGN columns",
            torch.stack([columns[i] for i in indices]),
            ggn[:, indices].T,
        ),
        (f"top {NUM_DIRECTIONS} GGN eigenvalues", evals, top_evals),
        ("damped Newton step", _flat(step), ref_step),
    ]
    return [_check(name, actual, expected, tolerance) for name, actual, expected in pairs]


def _check(name: str, actual: Tensor, expected: Tensor, tolerance: float) -> Check:
    """Compare with a tolerance relative to the largest reference entry."""
    atol = tolerance * expected.abs().max().item()
    [row] = verify.compare(actual, expected, rtol=0.0, atol=atol, names=[name]).rows
    return Check(name, row.max_rel_error, tolerance, row.passed)


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    dataset: Dataset,
    step: Callable[[Tensor, Tensor], None],
    args: argparse.Namespace,
    name: str,
) -> dict[str, list[float]]:
    """Train for ``args.epochs`` epochs and record the metrics before and after each epoch.

    Args:
        model: The model, trained in place.
        loss_fn: The loss.
        dataset: The data; batches shuffled by ``args.seed``.
        step: Takes one training step on a batch.
        args: The demo's options (``epochs``, ``seed``, ``no_progress``).
        name: The optimiser's name, for the progress bar.

    Returns:
        Lists per epoch (epoch 0 = before training) of ``train_loss``, ``test_loss``,
        ``test_accuracy`` and ``seconds`` (training time so far, evaluation excluded).
    """
    history: dict[str, list[float]] = {
        "train_loss": [],
        "test_loss": [],
        "test_accuracy": [],
        "seconds": [],
    }
    elapsed = 0.0

    def record() -> None:
        train_loss, _ = evaluate(model, loss_fn, dataset.train_inputs, dataset.train_targets)
        test_loss, accuracy = evaluate(model, loss_fn, dataset.test_inputs, dataset.test_targets)
        history["train_loss"].append(train_loss)
        history["test_loss"].append(test_loss)
        history["test_accuracy"].append(accuracy)
        history["seconds"].append(elapsed)

    record()
    generator = torch.Generator().manual_seed(args.seed + 1)
    steps_per_epoch = math.ceil(len(dataset.train_targets) / BATCH_SIZE)
    with tqdm(
        total=args.epochs * steps_per_epoch,
        desc=f"{name:>13}",
        unit="step",
        disable=args.no_progress,
        leave=True,
    ) as bar:
        for _ in range(args.epochs):
            start = time.perf_counter()
            for inputs, targets in dataset.batches(BATCH_SIZE, generator):
                step(inputs, targets)
                bar.update()
            elapsed += time.perf_counter() - start
            record()
            bar.set_postfix(
                loss=f"{history['train_loss'][-1]:.3f}",
                test_acc=f"{100 * history['test_accuracy'][-1]:.1f}%",
            )
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor
) -> tuple[float, float]:
    """Loss and accuracy of a classifier on a set.

    Args:
        model: The classifier.
        loss_fn: The loss (mean reduction).
        inputs: The inputs.
        targets: The class labels.

    Returns:
        ``(loss, accuracy)``.
    """
    logits = model(inputs)
    accuracy = (logits.argmax(dim=1) == targets).double().mean()
    return loss_fn(logits, targets).item(), accuracy.item()


def _adam(model: nn.Module, loss_fn: nn.Module) -> Callable[[Tensor, Tensor], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=ADAM_LR)

    def step(inputs: Tensor, targets: Tensor) -> None:
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    return step


def _damped_newton(model: nn.Module, loss_fn: nn.Module) -> Callable[[Tensor, Tensor], None]:
    optimizer = DampedNewton(model, loss_fn, criterion=top_k(NUM_DIRECTIONS), damping=DAMPING)

    def step(inputs: Tensor, targets: Tensor) -> None:
        optimizer.step((inputs, targets))

    return step


def _write_figures(
    out: Path,
    names: list[str],
    diagonal: list[Tensor],
    spectra: dict[str, Tensor],
    histories: dict[str, dict[str, list[float]]],
    calibrated: dict[str, dict[str, Any]],
) -> list[str]:
    files = ["ggn_spectrum.png", "ggn_diagonal.png", "training.png", "calibration.png"]
    num_samples = BATCH_SIZE
    figures.plot_spectrum(
        {label: values.tolist() for label, values in spectra.items()},
        NUM_DIRECTIONS,
        num_samples,
        out / files[0],
    )
    figures.plot_diagonal(
        {name: d.detach().cpu().double().numpy() for name, d in zip(names, diagonal, strict=True)},
        out / files[1],
    )
    figures.plot_training(histories, out / files[2])
    figures.plot_reliability(
        {name: result["reliability"] for name, result in calibrated.items()}, out / files[3]
    )
    return files


def _print_summary(
    report: dict[str, Any],
    checks: list[Check],
    timings: dict[str, float],
    histories: dict[str, dict[str, list[float]]],
    dtype: torch.dtype,
) -> None:
    print(
        f"\nchecks against plain autograd on a batch of {report['ggn_eigenvalues']['batch_size']}"
        f" ({str(dtype).removeprefix('torch.')}; error relative to the largest reference entry)"
    )
    print(
        format_table(
            ["quantity", "max rel error", "tolerance", "result"],
            [
                [
                    c.quantity,
                    f"{c.max_rel_error:.1e}",
                    f"{c.tolerance:.0e}",
                    "pass" if c.passed else "FAIL",
                ]
                for c in checks
            ],
        )
    )
    print("\ntimings")
    print(
        format_table(["what", "seconds"], [[name, f"{sec:.3f}"] for name, sec in timings.items()])
    )
    print("\ntraining")
    rows = []
    for name, history in histories.items():
        rows.append(
            [
                name,
                f"{history['train_loss'][0]:.3f} -> {history['train_loss'][-1]:.3f}",
                f"{100 * history['test_accuracy'][-1]:.1f}%",
                f"{history['seconds'][-1]:.1f}",
            ]
        )
    print(format_table(["optimizer", "training loss", "test accuracy", "seconds"], rows))
    _print_calibration(report["calibration"])
    evals = report["ggn_eigenvalues"]["largest_at_initialisation"][:10]
    print(f"\n10 largest GGN eigenvalues at initialisation: {', '.join(f'{v:.3g}' for v in evals)}")


def _print_calibration(results: dict[str, dict[str, Any]]) -> None:
    """The calibration table: MAP against Laplace for each trained model and test set."""
    first = next(iter(results.values()))["laplace"]
    print(
        f"\ncalibration: post-hoc Laplace ({first['hessian_structure']}, "
        f"{first['subset_of_weights']} weights, prior precision by marginal likelihood, GLM "
        "predictive with probit) against the MAP; 'shifted': the test set moved by one pixel"
    )
    test_sets = list(next(iter(results.values()))["metrics"])
    headers = ["trained with", "predictive", "prior prec."]
    headers += [f"{s} {m}" for s in test_sets for m in ("NLL", "ECE", "acc.")]
    rows = []
    for name, result in results.items():
        for predictive in ("MAP", "Laplace"):
            prior = f"{result['laplace']['prior_precision']:.3g}" if predictive != "MAP" else ""
            row = [name, predictive, prior]
            for test_set in test_sets:
                values = result["metrics"][test_set][predictive]
                row += [f"{values['nll']:.3f}", f"{values['ece']:.3f}"]
                row.append(f"{100 * values['accuracy']:.1f}%")
            rows.append(row)
    print(format_table(headers, rows))
