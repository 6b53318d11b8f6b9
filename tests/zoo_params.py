"""pytest parameters over the cases of curvkit.testing.zoo, with the filters of the warnings they
cause.

A filter names one exact message and applies only to the tests of the case that raises it on
purpose, so the same message raised by any other model still shows.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

#: The zoo's cnn3d uses padding="same" with an even kernel and an odd dilation on purpose (the
#: Conv rule must handle the asymmetric padding), which torch warns may copy the input.
SAME_PADDING_EVEN_KERNEL = pytest.mark.filterwarnings(
    "ignore:Using padding='same' with even kernel lengths and odd dilation:UserWarning"
)
FILTERS = {"cnn3d": SAME_PADDING_EVEN_KERNEL}


def case_params(cases: Iterable[str | tuple]) -> list:
    """``cases`` for ``pytest.mark.parametrize``, each with the filters of its model.

    Args:
        cases: Names of zoo cases, or tuples of arguments whose first entry is one.

    Returns:
        One ``pytest.param`` per case, with the same id as the plain value.
    """
    params = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        params.append(pytest.param(*values, marks=FILTERS.get(values[0], ())))
    return params
