"""Helpers shared by the subcommands: device and dtype options, tables, timers."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CommandError(Exception):
    """A failure that the command reports in one line and turns into an exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_torch_options(parser: argparse.ArgumentParser, default_dtype: str) -> None:
    """Add ``--device``, ``--dtype`` and ``--threads`` to a subcommand's parser.

    Args:
        parser: The subcommand's parser.
        default_dtype: The name of the default dtype, a key of :data:`DTYPES`.
    """
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=default_dtype,
        help="floating-point precision (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="CPU threads for torch (default: %(default)s; the models here are small, and more "
        "threads than idle cores slow them down)",
    )


def apply_torch_options(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Set torch's threads from the options of :func:`add_torch_options`.

    Args:
        args: The parsed options.

    Returns:
        The device and dtype to run on.

    Raises:
        CommandError: If the device is not available.
    """
    torch.set_num_threads(args.threads)
    return resolve_device(args.device), DTYPES[args.dtype]


def positive_int(text: str) -> int:
    """Parse a positive integer option.

    Args:
        text: The option's value.

    Returns:
        The integer.

    Raises:
        argparse.ArgumentTypeError: If it is not a positive integer.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def resolve_device(name: str) -> torch.device:
    """Turn a ``--device`` value into a device that exists on this machine.

    Args:
        name: The option's value.

    Returns:
        The device.

    Raises:
        CommandError: With exit code 2 if the name is not a device or the device is unavailable.
    """
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CommandError(f"--device {name!r} is not a torch device: {error}", 2) from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
            )
            raise CommandError(
                f"--device {name}: CUDA is not available (torch {torch.__version__} is built "
                f"{build}, or no GPU is visible); run on --device cpu",
                2,
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible", 2
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {name}: MPS is not available on this machine", 2)
    elif device.type not in ("cpu", "cuda", "mps"):
        raise CommandError(f"--device {name}: use cpu, cuda or mps", 2)
    return device


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a plain-text table with a header and a rule.

    Args:
        headers: The column titles.
        rows: The rows, one value per column (formatted with ``str``).

    Returns:
        The table, lines joined by newlines.
    """
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]

    def render(line: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(cells[0]).rstrip(), rule, *(render(c).rstrip() for c in cells[1:])])


@contextmanager
def stopwatch(timings: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Record the wall time of a block under ``timings[name]``, waiting for the device.

    Args:
        timings: Where the seconds go.
        name: The key.
        device: Synchronised before and after so that asynchronous kernels are counted.

    Yields:
        Nothing; the block runs inside.
    """
    _synchronize(device)
    start = time.perf_counter()
    yield
    _synchronize(device)
    timings[name] = time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
