"""``curvkit bench``: run the benchmark scripts of a source checkout and print their tables.

The scripts live in ``benchmarks/`` next to the package in a clone of the repository; they are
not installed with it. A script that defines a top-level ``run(quick: bool) -> list[dict]`` is
imported and its rows are printed as one table (columns: the union of the rows' keys); any other
script runs in a subprocess, with ``--quick`` passed through, and prints its own table.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import curvkit
from curvkit.cli._common import CommandError, format_table

SCRIPT_GLOB = "bench_*.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``curvkit bench`` to its parser."""
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="run only the scripts whose name contains NAME (e.g. ggn, newton); default: all",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small problems and few repeats (a smoke run)"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="the benchmarks directory (default: ./benchmarks, then the one next to the package)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the selected benchmark scripts.

    Args:
        args: The parsed options of ``curvkit bench``.

    Returns:
        0 if every script ran, 1 if one failed.

    Raises:
        CommandError: If no benchmarks directory or no matching script is found.
    """
    directory = locate_benchmarks(args.dir)
    scripts = select_scripts(directory, args.names)
    failed = []
    for script in scripts:
        print(f"\n== {script.name}{' (quick)' if args.quick else ''} ==", flush=True)
        start = time.perf_counter()
        ok = run_script(script, args.quick)
        print(f"-- {script.name}: {time.perf_counter() - start:.1f} s", flush=True)
        if not ok:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def locate_benchmarks(directory: Path | None) -> Path:
    """Find the benchmarks directory.

    Args:
        directory: The ``--dir`` option, or ``None`` to search the usual places.

    Returns:
        The directory.

    Raises:
        CommandError: If it does not exist.
    """
    if directory is not None:
        if not directory.is_dir():
            raise CommandError(f"--dir {directory}: no such directory", 2)
        return directory
    candidates = [
        Path.cwd() / "benchmarks",
        Path(curvkit.__file__).resolve().parents[1] / "benchmarks",
    ]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob(SCRIPT_GLOB)):
            return candidate
    raise CommandError(
        "no benchmarks directory found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "): the benchmarks come with a clone of the curvkit repository, not with the installed "
        "package; run `curvkit bench` from the clone's root or pass --dir path/to/benchmarks"
    )


def select_scripts(directory: Path, names: Sequence[str]) -> list[Path]:
    """The benchmark scripts of a directory, filtered by name.

    Args:
        directory: The benchmarks directory.
        names: Substrings; a script is kept if its file name contains one (all if empty).

    Returns:
        The scripts, sorted by name.

    Raises:
        CommandError: If no script matches.
    """
    scripts = sorted(directory.glob(SCRIPT_GLOB))
    if names:
        scripts = [s for s in scripts if any(name in s.name for name in names)]
    if not scripts:
        available = ", ".join(s.stem for s in sorted(directory.glob(SCRIPT_GLOB))) or "none"
        raise CommandError(
            f"no benchmark script in {directory} matches {list(names) or SCRIPT_GLOB} "
            f"(available: {available})"
        )
    return scripts


def run_script(script: Path, quick: bool) -> bool:
    """Run one script, through its ``run(quick)`` function if it has one.

    Args:
        script: The script's path.
        quick: Whether to ask for a quick run.

    Returns:
        Whether it ran without error.
    """
    if not _defines_run(script):
        command = [sys.executable, str(script), *(["--quick"] if quick else [])]
        return subprocess.run(command, cwd=script.parent, check=False).returncode == 0
    try:
        rows = _import_script(script).run(quick=quick)
    except Exception:
        traceback.print_exc()
        return False
    print(format_rows(rows) if rows else "(no rows)", flush=True)
    return True


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """Render a benchmark's rows as a table whose columns are the union of the rows' keys.

    Args:
        rows: One dict per measurement.

    Returns:
        The table.
    """
    headers: list[str] = []
    for row in rows:
        headers.extend(key for key in row if key not in headers)
    return format_table(headers, [[_format_value(row.get(h, "")) for h in headers] for row in rows])


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "-"
    return f"{value:.3g}"


def _defines_run(script: Path) -> bool:
    # Read, do not import: importing a script runs its module-level code (shims, thread settings)
    # in this process, which only the subprocess should see.
    try:
        tree = ast.parse(script.read_text(), filename=str(script))
    except SyntaxError:
        return False
    return any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body)


def _import_script(script: Path) -> ModuleType:
    # Scripts may import helpers that sit beside them (``from _common import ...``).
    sys.path.insert(0, str(script.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"curvkit_bench_{script.stem}", script)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {script}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(script.parent))
    return module
