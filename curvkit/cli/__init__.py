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

#: The subcommands: each module defines ``NAME``, ``HELP``, ``DESCRIPTION``,
#: ``add_arguments(parser)`` and ``run(args) -> exit code``.
COMMANDS = (demo, verify, bench)


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
    for command in COMMANDS:
        subparser = subparsers.add_parser(
            command.NAME, help=command.HELP, description=command.DESCRIPTION
        )
        command.add_arguments(subparser)
        subparser.set_defaults(handler=command.run, command=command.NAME)
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
