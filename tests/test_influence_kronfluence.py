"""curvkit.influence against kronfluence 1.0.1 itself: the same scores with the same settings.

kronfluence runs through its own ``Task``/``Analyzer`` API on a deep copy of the model (it wraps
and freezes the modules it is given), writes its factors and scores to ``tmp_path``, and computes
every quantity in float64. Its curvature is the empirical Fisher (``use_empirical_fisher=True``,
curvkit's ``fisher_type="empirical"``), the only setting whose samples both libraries share.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.influence import fit_factors, pairwise_scores, self_scores

kronfluence = pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

STRATEGIES = ["ekfac", "kfac", "diagonal", "identity"]
RTOL = 1e-6
FLOAT = torch.float64


class _Transpose(nn.Module):
    """[N, T, C] -> [N, C, T], so that cross-entropy sees classes on axis 1."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


def _mlp() -> tuple[nn.Module, Tensor, Tensor]:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Tanh())
    model.append(nn.Linear(4, 3))
    return model, torch.randn(13, 5), torch.randint(3, (13,))


def _conv() -> tuple[nn.Module, Tensor, Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    return model, torch.randn(11, 2, 5, 5), torch.randint(3, (11,))


def _sequence() -> tuple[nn.Module, Tensor, Tensor]:
    """A Linear applied at every position of [N, T, D]; the loss sums over positions."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), _Transpose())
    return model, torch.randn(9, 6, 4), torch.randint(3, (9, 6))


MODELS = {"mlp": _mlp, "conv": _conv, "sequence": _sequence}


class _ClassificationTask(Task):
    def compute_train_loss(self, batch, model, sample=False):
        inputs, targets = batch
        logits = model(inputs)
        if sample:  # kronfluence's Monte-Carlo Fisher; these tests use the empirical one
            raise AssertionError("the tests compare the empirical Fisher only")
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def _kronfluence(model, train, query, strategy, tmp_path: Path, dampings):
    """kronfluence's pairwise and self-influence scores per damping, every dtype float64."""
    task = _ClassificationTask()
    prepared = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(
        "test",
        prepared,
        task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(tmp_path),
        log_level=logging.ERROR,
    )
    factor_args = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=True,
        activation_covariance_dtype=FLOAT,
        gradient_covariance_dtype=FLOAT,
        eigendecomposition_dtype=FLOAT,
        per_sample_gradient_dtype=FLOAT,
        lambda_dtype=FLOAT,
    )
    dataset = torch.utils.data.TensorDataset(*train)
    results = []
    # kronfluence frees memory with gc.collect() at every stage, which takes seconds in a test
    # process holding many objects; it changes no number.
    with warnings.catch_warnings(), mock.patch("gc.collect", return_value=0):
        warnings.simplefilter("ignore")  # kronfluence's own deprecation warnings
        analyzer.fit_all_factors(
            "factors", dataset, per_device_batch_size=4, factor_args=factor_args
        )
        for number, damping in enumerate(dampings):
            score_args = ScoreArguments(
                damping_factor=damping,
                per_sample_gradient_dtype=FLOAT,
                precondition_dtype=FLOAT,
                score_dtype=FLOAT,
            )
            analyzer.compute_pairwise_scores(
                f"pairwise{number}",
                "factors",
                torch.utils.data.TensorDataset(*query),
                dataset,
                per_device_query_batch_size=3,
                per_device_train_batch_size=5,
                score_args=score_args,
            )
            analyzer.compute_self_scores(
                f"self{number}",
                "factors",
                dataset,
                per_device_train_batch_size=5,
                score_args=score_args,
            )
            results.append(
                (
                    analyzer.load_pairwise_scores(f"pairwise{number}")["all_modules"],
                    analyzer.load_self_scores(f"self{number}")["all_modules"],
                )
            )
    return results


def _problem(name: str):
    torch.manual_seed(0)
    model, inputs, targets = MODELS[name]()
    model = model.to(FLOAT)
    inputs = inputs.to(FLOAT)
    train = (inputs[:-4], targets[:-4])
    query = (inputs[-4:], targets[-4:])
    # curvkit reads the training data in batches other than kronfluence's, with a mean loss.
    batches = [(train[0][:3], train[1][:3]), (train[0][3:], train[1][3:])]
    return model, train, query, batches


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0
    assert ((actual - expected).abs().max() / scale).item() < RTOL


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(MODELS))
def test_scores_equal_kronfluence(name: str, strategy: str, tmp_path: Path):
    model, train, query, batches = _problem(name)
    dampings = [None, 0.03] if strategy == "ekfac" else [None]
    expected = _kronfluence(model, train, query, strategy, tmp_path, dampings)
    # One fit serves every damping and both kinds of score, as kronfluence's factors do.
    factors = fit_factors(
        model, nn.CrossEntropyLoss(), batches, curvature=strategy, fisher_type="empirical"
    )
    for damping, (pairwise, self_influence) in zip(dampings, expected, strict=True):
        options = {"curvature": strategy, "damping": damping, "factors": factors}
        _assert_close(
            pairwise_scores(model, nn.CrossEntropyLoss(), train, query, **options), pairwise
        )
        _assert_close(
            self_scores(model, nn.CrossEntropyLoss(reduction="sum"), train, **options),
            self_influence,
        )
    # Without factors=, the fit on the batches (a mean loss) is part of the call.
    actual = pairwise_scores(
        model, nn.CrossEntropyLoss(), batches, query, curvature=strategy, fisher_type="empirical"
    )
    _assert_close(actual, expected[0][0])
