"""The figures of ``curvkit demo``: GGN spectrum, per-layer diagonal, training, calibration.

matplotlib is an optional dependency (the ``demo`` extra); figures are drawn on
:class:`matplotlib.figure.Figure` objects directly, so no pyplot state or display is involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from curvkit.cli._common import CommandError

#: One colour per optimiser, the same in every figure.
COLOURS = {"damped Newton": "#d1495b", "Adam": "#00798c"}
#: Eigenvalues below this fraction of the largest are numerically zero and not plotted.
ZERO_EIGENVALUE = 1e-10


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise CommandError(
            "the demo's figures need matplotlib: pip install 'curvkit[demo]' (or pass --no-figures)"
        ) from error
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def plot_spectrum(
    spectra: Mapping[str, Sequence[float]], num_directions: int, num_samples: int, path: Path
) -> None:
    """Plot GGN eigenvalues, largest first, on a log scale.

    Args:
        spectra: Eigenvalues per label (e.g. at initialisation and after training).
        num_directions: How many of the largest eigenvalues the damped Newton steps use; shaded.
        num_samples: The batch size the GGN was computed on (for the title).
        path: Where to write the PNG.
    """
    figure = _figure(6.4, 4.0)
    axes = figure.add_subplot()
    largest = max(float(np.max(values)) for values in spectra.values())
    for (label, values), colour in zip(
        spectra.items(), ("0.35", COLOURS["damped Newton"]), strict=False
    ):
        ordered = np.sort(np.asarray(values, dtype=float))[::-1]
        # Eigenvalues at rounding level are zeros of the GGN: they would only stretch the axis.
        ordered = ordered[ordered > ZERO_EIGENVALUE * largest]
        axes.plot(np.arange(1, len(ordered) + 1), ordered, color=colour, lw=1.8, label=label)
    axes.axvspan(0.5, num_directions + 0.5, color="0.85", zorder=0)
    axes.text(
        1,
        0.03,
        f"the {num_directions} damped\nNewton directions",
        transform=axes.get_xaxis_transform(),
        fontsize=9,
        color="0.3",
    )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("rank of the eigenvalue (1 = largest)")
    axes.set_ylabel("GGN eigenvalue")
    axes.set_title(f"Nonzero spectrum of the GGN on a batch of {num_samples} samples", fontsize=11)
    axes.grid(True, which="major", alpha=0.4)
    axes.legend()
    figure.savefig(path)


def plot_diagonal(diagonal: Mapping[str, np.ndarray], path: Path) -> Any:
    """Plot the distribution of the GGN diagonal's positive entries for each parameter tensor.

    A log axis cannot show exact zeros (a dead ReLU's incoming weights, an unused class's bias):
    they are left out of the boxes and counted in the tensor's label instead.

    Args:
        diagonal: The diagonal's entries per parameter name.
        path: Where to write the PNG.

    Returns:
        The figure.
    """
    figure = _figure(6.4, 4.0)
    axes = figure.add_subplot()
    names = list(diagonal)
    entries = [np.asarray(diagonal[n], dtype=float).ravel() for n in names]
    # A tensor without a positive entry gets an empty box (NaN is not drawn).
    logs = [np.log10(v[v > 0]) if (v > 0).any() else np.array([np.nan]) for v in entries]
    labels = []
    for name, values in zip(names, entries, strict=True):
        zeros = int((values <= 0).sum())
        labels.append(f"{name}\n({values.size}" + (f", {zeros} zero)" if zeros else ")"))
    axes.boxplot(logs, whis=(0, 100), widths=0.6)
    axes.set_xticks(range(1, len(names) + 1), labels)
    axes.set_xlabel("parameter tensor (number of entries, of them exactly zero)")
    axes.set_ylabel("log10 of the GGN diagonal entry")
    axes.set_title(
        "Exact GGN diagonal over the training set, entries > 0\n"
        "(boxes: quartiles, whiskers: min to max)",
        fontsize=11,
    )
    axes.grid(True, axis="y", alpha=0.4)
    figure.savefig(path)
    return figure


def plot_training(histories: Mapping[str, Mapping[str, Sequence[float]]], path: Path) -> Any:
    """Plot training loss and test accuracy per epoch, and test accuracy over wall-clock time.

    The per-epoch panels hide what an epoch costs; the third panel shows it: each optimiser's
    test accuracy against its training time (evaluation excluded), on a log axis since the
    optimisers' costs per epoch differ by orders of magnitude.

    Args:
        histories: Per optimiser, lists ``train_loss``, ``test_accuracy`` and ``seconds``
            (training time so far), epoch 0 first.
        path: Where to write the PNG.

    Returns:
        The figure.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _figure(13.0, 3.6)
    loss_axes, accuracy_axes, time_axes = figure.subplots(1, 3)
    for name, history in histories.items():
        epochs = np.arange(len(history["train_loss"]))
        colour = COLOURS.get(name)
        loss_axes.plot(epochs, history["train_loss"], "o-", ms=3, color=colour, label=name)
        accuracy = 100 * np.asarray(history["test_accuracy"])
        accuracy_axes.plot(epochs, accuracy, "o-", ms=3, color=colour, label=name)
        # Epoch 0 (before training) took no time: it cannot sit on a log axis.
        seconds = np.asarray(history["seconds"], dtype=float)
        time_axes.plot(seconds[1:], accuracy[1:], "o-", ms=3, color=colour, label=name)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss (cross-entropy)")
    loss_axes.set_title("Training loss")
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("test accuracy (%)")
    accuracy_axes.set_ylim(0, 100)
    loss_axes.set_ylim(bottom=0)
    accuracy_axes.set_title("Test accuracy")
    time_axes.set_xscale("log")
    time_axes.set_xlabel("training time (s, wall clock)")
    time_axes.set_ylabel("test accuracy (%)")
    time_axes.set_ylim(0, 100)
    time_axes.set_title("Test accuracy over time")
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axes in (loss_axes, accuracy_axes, time_axes):
        axes.grid(True, alpha=0.4)
        axes.legend()
    figure.savefig(path)
    return figure


def plot_reliability(
    reliability: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]],
    path: Path,
) -> Any:
    """Plot reliability diagrams: accuracy against confidence per bin, MAP and Laplace.

    One panel per test set; per optimiser, the MAP's softmax dashed and the Laplace predictive
    solid (a calibrated predictive lies on the diagonal). Empty bins are not drawn; the marker
    areas grow with the share of the points in the bin.

    Args:
        reliability: Optimiser -> test set -> predictive (``"MAP"``, ``"Laplace"``) -> the
            bins' ``confidence``, ``accuracy`` and ``share``.
        path: Where to write the PNG.

    Returns:
        The figure.
    """
    test_sets = list(next(iter(reliability.values())))
    figure = _figure(4.2 * len(test_sets), 4.0)
    panels = np.atleast_1d(figure.subplots(1, len(test_sets), sharey=True))
    for axes, test_set in zip(panels, test_sets, strict=True):
        axes.plot([0, 1], [0, 1], ":", color="0.5", lw=1)
        for name, by_set in reliability.items():
            for predictive, style in (("MAP", "--"), ("Laplace", "-")):
                bins = by_set[test_set][predictive]
                share = np.asarray(bins["share"], dtype=float)
                shown = share > 0
                confidence = np.asarray(bins["confidence"], dtype=float)[shown]
                accuracy = np.asarray(bins["accuracy"], dtype=float)[shown]
                colour = COLOURS.get(name)
                label = f"{name}, {predictive}"
                axes.plot(confidence, accuracy, style, color=colour, lw=1.6, label=label)
                axes.scatter(confidence, accuracy, s=200 * share[shown] + 4, color=colour)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("confidence (largest class probability)")
        axes.set_title(f"Reliability, {test_set} set", fontsize=11)
        axes.grid(True, alpha=0.4)
    panels[0].set_ylabel("accuracy in the confidence bin")
    panels[0].legend(fontsize=8, loc="upper left")
    figure.savefig(path)
    return figure


def require_matplotlib() -> None:
    """Fail early, before any work, if the figures cannot be drawn.

    Raises:
        CommandError: If matplotlib is not installed.
    """
    _figure(1, 1)
