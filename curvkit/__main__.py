"""``python -m curvkit``: the ``curvkit`` command."""

from curvkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
