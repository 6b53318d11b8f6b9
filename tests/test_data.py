"""Datasets: iterables of batches give the curvature of the whole dataset's loss."""

from __future__ import annotations

import pytest
import torch
from test_ggn import ATOL, RTOL, build, flat, problem
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit
from curvkit.core import data as data_utils
from curvkit.testing.verify import compare, reference_diag_ggn, reference_ggn

SIZES = [3, 1, 5]  # unequal batch sizes: a plain average of batch results would be wrong


def split(tensor: torch.Tensor | tuple[torch.Tensor, ...], sizes: list[int]):
    if isinstance(tensor, tuple):
        return list(zip(*(t.split(sizes) for t in tensor), strict=True))
    return list(tensor.split(sizes))


def batched(model_name: str, loss_name: str, reduction: str):
    model, loss_fn, inputs, targets = problem(model_name, loss_name, reduction, sum(SIZES))
    batches = list(zip(split(inputs, SIZES), split(targets, SIZES), strict=True))
    return model, loss_fn, inputs, targets, batches


CASES = [
    ("mlp", "mse", "mean"),
    ("mlp", "mse", "sum"),
    ("mlp", "weighted_ce", "mean"),
    ("mlp", "ce", "sum"),
    ("mlp", "bce", "mean"),
    ("mlp", "convex", "mean"),
    ("two_inputs", "ce", "mean"),
]


@pytest.mark.parametrize(("model_name", "loss_name", "reduction"), CASES)
def test_dataset_equals_concatenated_batch(model_name: str, loss_name: str, reduction: str):
    model, loss_fn, inputs, targets, batches = batched(model_name, loss_name, reduction)
    expected = reference_ggn(model, loss_fn, inputs, targets)
    dim = expected.shape[0]

    diagonal = curvkit.diag_ggn(model, loss_fn, batches)
    compare(
        diagonal, reference_diag_ggn(model, loss_fn, inputs, targets), rtol=RTOL, atol=ATOL
    ).assert_passed()
    compare(
        curvkit.ggn_matrix(model, loss_fn, batches), expected, rtol=RTOL, atol=ATOL
    ).assert_passed()

    vector = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    product = curvkit.ggn_vector_product(model, loss_fn, batches, vector)
    compare(product, expected @ vector, rtol=RTOL, atol=ATOL).assert_passed()

    indices = [0, dim - 1, 2]
    columns = list(curvkit.ggn_columns(model, loss_fn, batches, indices=indices, chunk_size=2))
    compare([c for _, c in columns], [expected[:, i] for i in indices], rtol=RTOL).assert_passed()

    operator = curvkit.GGNOperator(model, loss_fn, batches)
    identity = torch.eye(dim, dtype=torch.float64)
    compare(operator @ identity, expected, rtol=RTOL, atol=ATOL).assert_passed()


def test_dataloader_with_smaller_last_batch():
    model, loss_fn, inputs, targets = problem("cnn", "ce", "mean", 7)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=3)
    compare(
        curvkit.diag_ggn(model, loss_fn, loader),
        reference_diag_ggn(model, loss_fn, inputs, targets),
        rtol=RTOL,
        atol=ATOL,
    ).assert_passed()


def test_one_shot_iterator_is_fine_for_one_pass_and_refused_for_several():
    model, loss_fn, inputs, targets, batches = batched("mlp", "mse", "mean")
    diagonal = curvkit.diag_ggn(model, loss_fn, (batch for batch in batches))
    compare(
        diagonal, reference_diag_ggn(model, loss_fn, inputs, targets), rtol=RTOL
    ).assert_passed()
    operator = curvkit.GGNOperator(model, loss_fn, iter(batches))
    vector = torch.ones(operator.shape[0], dtype=torch.float64)
    with pytest.raises(TypeError, match="one-shot iterator"):
        operator @ vector
    with pytest.raises(TypeError, match="one-shot iterator"):
        list(curvkit.ggn_columns(model, loss_fn, iter(batches), chunk_size=1))


def test_monte_carlo_on_a_dataset_is_reproducible():
    model, loss_fn, _, _, batches = batched("mlp", "ce", "mean")
    first = curvkit.diag_ggn(
        model, loss_fn, batches, mc_samples=1, generator=torch.Generator().manual_seed(0)
    )
    second = curvkit.diag_ggn(
        model, loss_fn, batches, mc_samples=1, generator=torch.Generator().manual_seed(0)
    )
    compare(first, second, rtol=0, atol=0).assert_passed()
    operator = curvkit.GGNOperator(
        model, loss_fn, batches, mc_samples=1, generator=torch.Generator().manual_seed(0)
    )
    identity = torch.eye(operator.shape[0], dtype=torch.float64)
    # The operator replays the same samples on every pass: its diagonal is the MC diagonal above.
    compare(torch.diagonal(operator @ identity), flat(first), rtol=1e-12, atol=ATOL).assert_passed()


def test_batches_with_every_target_ignored():
    model, inputs = build("mlp", 6)
    targets = torch.tensor([0, 2, -100, -100, 1, -100])
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64))
    # the middle batch has nothing but ignored targets: it weighs nothing, and the rest is exact.
    batches = [(inputs[:2], targets[:2]), (inputs[2:4], targets[2:4]), (inputs[4:], targets[4:])]
    compare(
        curvkit.diag_ggn(model, loss_fn, batches),
        reference_diag_ggn(model, loss_fn, inputs, targets),
        rtol=RTOL,
        atol=ATOL,
    ).assert_passed()
    with pytest.raises(ValueError, match="sums to zero"):
        curvkit.diag_ggn(model, loss_fn, [batches[1], batches[1]])


def test_progress_bar(capsys: pytest.CaptureFixture[str]):
    model, loss_fn, _, _, batches = batched("mlp", "mse", "sum")
    curvkit.diag_ggn(model, loss_fn, batches, progress=True)
    assert "diag_ggn" in capsys.readouterr().err
    curvkit.diag_ggn(model, loss_fn, batches)  # automatic: 3 batches are too few for a bar
    assert capsys.readouterr().err == ""
    many = batches * (data_utils.AUTO_PROGRESS_MIN_BATCHES // len(batches) + 1)
    curvkit.diag_ggn(model, loss_fn, many)
    assert "diag_ggn" in capsys.readouterr().err
    curvkit.diag_ggn(model, loss_fn, many, progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress"):
        curvkit.diag_ggn(model, loss_fn, batches, progress="yes")


def test_is_batch_and_num_batches():
    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert data_utils.is_batch((x, y))
    assert data_utils.is_batch([x, y])
    assert data_utils.is_batch(((x, x), y))
    assert not data_utils.is_batch([(x, y), (x, y)])
    assert not data_utils.is_batch((x, y, y))
    assert data_utils.num_batches((x, y)) == 1
    assert data_utils.num_batches([(x, y)] * 4) == 4
    assert data_utils.num_batches(iter([(x, y)])) is None
    assert data_utils.check_batch([[x, x], y])[0] == (x, x)


def test_all_reduce_without_process_group_changes_nothing():
    tensors = [torch.ones(2), torch.arange(3.0)]
    data_utils.all_reduce_sum_(tensors)
    assert data_utils.distributed_world() == 1
    assert torch.equal(tensors[0], torch.ones(2))
    assert torch.equal(tensors[1], torch.arange(3.0))


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (5, TypeError, "iterable of such batches"),
        (torch.zeros(3, 2), TypeError, "iterable of such batches"),
        ([], ValueError, "no batch"),
        ([(torch.zeros(2, 6), torch.zeros(2, 4), 1)], TypeError, "batch 0 of data"),
        ([(torch.zeros(2, 6).double(), torch.zeros(2, 4)), "b"], TypeError, "batch 1 of data"),
        ([("inputs", torch.zeros(2, 4))], TypeError, "inputs of batch 0"),
        ([(torch.zeros(2, 6), [0.0, 1.0])], TypeError, "targets of batch 0"),
        ([((), torch.zeros(2, 4))], TypeError, "inputs of batch 0"),
    ],
)
def test_bad_data(data: object, error: type[Exception], message: str):
    model, _ = build("mlp", 2)
    with pytest.raises(error, match=message):
        curvkit.diag_ggn(model, nn.MSELoss(), data)
