"""The ``curvkit`` command: ``curvkit demo``, ``curvkit verify`` and ``curvkit bench``.

Run ``curvkit --help`` (or ``python -m curvkit --help``) for the subcommands and
``curvkit SUBCOMMAND --help`` for their options. Exit codes: 0 on success, 1 if a verification
fails or a benchmark script errors, 2 for a bad option (as ``argparse``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import curvkit
from curvkit.cli import bench, demo, verify
from curvkit.cli._common import CommandError

__all__ = ["COMMANDS", "build_parser", "main"]

#: The subcommands: name -> (module, one-line help, description). Each module defines
#: ``add_arguments(parser)`` and ``run(args) -> exit code``.
COMMANDS = {
    "demo": (
        demo,
        "GGN diagonal, spectrum and damped Newton training of an MLP, checked vs autograd",
        "Train a small MLP on scikit-learn's bundled handwritten digits (8x8 images, 10 "
        "classes) with directionally damped Newton steps beside Adam; compute the exact GGN "
        "diagonal and spectrum; check the diagonal, GGN columns, eigenvalues and a damped "
        "Newton step against plain autograd; fit a post-hoc Laplace approximation to each "
        "trained MLP and compare its calibration with the MAP's; write figures and a JSON "
        "report. Exit code 1 if a check fails.",
    ),
    "verify": (
        verify,
        "check every curvature quantity against plain autograd on a model zoo",
        "Compare every curvature quantity of curvkit (output Hessian square roots, GGN "
        "diagonal, GGN-vector products, columns, dense GGN, linear operator, eigenpairs, "
        "directional derivatives, damped Newton steps) with references from plain autograd, "
        "on small models: MLP, CNN, residual network, LayerNorm + attention, embedding; and "
        "batched low-dimensional Newton steps with and without a trust region. "
        "Prints a pass/fail table; exit code 1 on any mismatch. Run it on a new GPU or torch "
        "version.",
    ),
    "bench": (
        bench,
        "benchmark curvkit against the installed peers (needs a source checkout)",
        "Run the benchmark scripts in benchmarks/ (bench_*.py) against whichever peers are "
        "installed (BackPACK, ViViT, curvlinops, Pyro, torch-secorder) and print tables of "
        "run times and ratios. The scripts come with a clone of the repository, not with "
        "the installed package.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of the ``curvkit`` command and its subcommands.

    Returns:
        The parser; each subcommand sets ``handler``, the function that runs it.
    """
    parser = argparse.ArgumentParser(
        prog="curvkit",
        description=(
            "Second-order curvature of PyTorch models: GGN diagonal, products, columns, "
            "eigenpairs, directional derivatives and damped Newton steps, each checked against "
            "plain autograd."
        ),
    )
    parser.add_argument("--version", action="version", version=f"curvkit {curvkit.__version__}")
    subparsers = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)
    for name, (module, help_text, description) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=description)
        module.add_arguments(subparser)
        subparser.set_defaults(handler=module.run, command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``curvkit`` command.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` if ``None``.

    Returns:
        The exit code: 0 on success, 1 if a check or benchmark failed, 2 for a bad option.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CommandError as error:
        print(f"curvkit {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
