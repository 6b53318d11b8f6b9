"""The ``curvkit`` command: options, exit codes, and that its checks can fail."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import curvkit
from curvkit.cli import calibration, demo, main, verify
from curvkit.testing.zoo import make_case

SUBCOMMANDS = ["demo", "verify", "bench"]


def exit_code(argv: list[str]) -> int:
    """Run the command; argparse's exits count as exit codes."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


@pytest.mark.parametrize("argv", [["--help"], *[[sub, "--help"] for sub in SUBCOMMANDS]])
def test_help(argv, capsys):
    assert exit_code(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: curvkit")
    if argv[0] == "demo":
        for option in ("--device", "--dtype", "--epochs", "--seed", "--data", "--out"):
            assert option in out
    if argv[0] == "verify":
        assert "--device" in out and "--dtype" in out
    if argv[0] == "bench":
        assert "--quick" in out


def test_python_dash_m(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "curvkit", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("curvkit ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["demo", "--epochs", "0"],
        ["demo", "--epochs", "two"],
        ["demo", "--data", "mnist"],
        ["demo", "--dtype", "float16"],
        ["verify", "--dtype", "half"],
        ["verify", "--unknown"],
        ["verify", "--threads", "0"],
        ["bench", "--quick=yes"],
    ],
)
def test_bad_options_exit_2(argv, capsys):
    assert exit_code(argv) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("sub", ["demo", "verify"])
def test_bad_device_exit_2(sub, capsys):
    assert exit_code([sub, "--device", "gpu0"]) == 2
    assert "not a torch device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("sub", ["demo", "verify"])
def test_cuda_without_cuda_exit_2(sub, capsys):
    assert exit_code([sub, "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_demo_synthetic_writes_report_and_figures(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["demo", "--data", "synthetic", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert exit_code(argv) == 0
    printed = capsys.readouterr().out
    assert "damped Newton step" in printed and "FAIL" not in printed
    report = json.loads((out / "report.json").read_text())
    assert report["all_checks_passed"] is True
    assert {c["quantity"] for c in report["checks"]} == {
        "GGN diagonal",
        f"{demo.NUM_COLUMNS} GGN columns",
        f"top {demo.NUM_DIRECTIONS} GGN eigenvalues",
        "damped Newton step",
        "Laplace: KFAC block of the last bias",
        "Laplace: GLM predictive (probit)",
    }
    assert all(c["max_rel_error"] < c["tolerance"] for c in report["checks"])
    for name in ("damped Newton", "Adam"):
        history = report["training"][name]
        assert len(history["train_loss"]) == 2
        assert history["train_loss"][1] < history["train_loss"][0]
    assert "calibration:" in printed and "shifted NLL" in printed
    for name in ("damped Newton", "Adam"):
        result = report["calibration"][name]
        assert result["laplace"]["hessian_structure"] == "kron"
        assert result["laplace"]["prior_precision"] > 0
        for test_set in ("test", "shifted"):
            for predictive in ("MAP", "Laplace"):
                metrics = result["metrics"][test_set][predictive]
                assert metrics["nll"] > 0 and 0 <= metrics["ece"] <= 1
                assert 0 <= metrics["accuracy"] <= 1
                bins = result["reliability"][test_set][predictive]
                assert sum(bins["share"]) == pytest.approx(1.0)
            # The probit predictive keeps the MAP's ranking of classes, nearly: same accuracy.
            map_accuracy = result["metrics"][test_set]["MAP"]["accuracy"]
            assert result["metrics"][test_set]["Laplace"]["accuracy"] == pytest.approx(
                map_accuracy, abs=0.1
            )
    assert report["figures"] == [
        "ggn_spectrum.png",
        "ggn_diagonal.png",
        "training.png",
        "calibration.png",
    ]
    for figure in report["figures"]:
        assert (out / figure).read_bytes().startswith(b"\x89PNG")


def test_demo_checks_catch_a_wrong_quantity(monkeypatch):
    """A curvkit result off by a little must fail the demo's check (so its exit code is 1)."""
    dataset = demo.load_dataset("synthetic", 0, torch.device("cpu"), torch.float64)
    model = demo.build_model(64, 10, 0).double()
    batch = (dataset.train_inputs[:8], dataset.train_targets[:8])
    loss_fn = torch.nn.CrossEntropyLoss()
    right = demo.diag_ggn

    def wrong_diag_ggn(*args, **kwargs):
        return [d * (1 + 1e-6) for d in right(*args, **kwargs)]

    monkeypatch.setattr(demo, "diag_ggn", wrong_diag_ggn)
    checks = demo._check_against_autograd(model, loss_fn, batch, 1e-9, {}, torch.device("cpu"))
    passed = {check.quantity: check.passed for check in checks}
    assert passed.pop("GGN diagonal") is False
    assert all(passed.values())


def test_calibration_metrics_by_hand():
    """NLL, ECE and accuracy on four points whose bins and gaps are known."""
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.55, 0.45]])
    targets = torch.tensor([0, 1, 1, 0])
    metrics = calibration.calibration_metrics(probs, targets)
    # bins: 0.95 twice (one right: accuracy 0.5), 0.65 (right), 0.55 (right)
    expected_ece = 0.5 * abs(0.5 - 0.95) + 0.25 * abs(1 - 0.65) + 0.25 * abs(1 - 0.55)
    assert metrics["ece"] == pytest.approx(expected_ece, abs=1e-7)
    expected_nll = -np.log([0.95, 0.05, 0.65, 0.55]).mean()
    assert metrics["nll"] == pytest.approx(expected_nll, abs=1e-7)
    assert metrics["accuracy"] == 0.75
    bins = calibration.reliability(probs, targets)
    assert bins.share[9] == 0.5 and bins.share[6] == 0.25 and bins.share[5] == 0.25
    assert sum(bins.share) == 1.0


def test_demo_laplace_checks_catch_a_wrong_predictive(monkeypatch):
    """A Laplace predictive off by a little fails the demo's check; the exact block still passes."""
    dataset = demo.load_dataset("synthetic", 0, torch.device("cpu"), torch.float64)
    model = demo.build_model(64, 10, 0).double()
    small = (dataset.train_inputs[:64], dataset.train_targets[:64])
    result = calibration.laplace_calibration(model, *small, {"test": small}, 32)
    la = result["la"]
    right = type(la).__call__

    def wrong_call(self, *args, **kwargs):
        return right(self, *args, **kwargs) * (1 + 1e-6)

    monkeypatch.setattr(type(la), "__call__", wrong_call)
    triples = calibration.laplace_references(la, model, small, dataset.test_inputs)
    passed = {name: demo._check(name, a, e, 1e-9).passed for name, a, e in triples}
    assert passed == {
        "Laplace: KFAC block of the last bias": True,
        "Laplace: GLM predictive (probit)": False,
    }


def test_verify_passes(capsys):
    assert exit_code(["verify"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    for model in ("MLP", "CNN", "residual", "LayerNorm + attention", "embedding"):
        assert model in out
    assert "batch of 5-d problems  Newton step, trust radius 0.5" in out


def test_verify_fails_on_a_wrong_quantity(monkeypatch, capsys):
    right = curvkit.ggn_vector_product

    def wrong_product(*args, **kwargs):
        return right(*args, **kwargs) * (1 + 1e-6)

    monkeypatch.setattr(curvkit, "ggn_vector_product", wrong_product)
    monkeypatch.setattr(verify, "MODELS", {"mlp": "MLP"})
    monkeypatch.setattr(verify, "check_newton_steps", lambda *args: [])
    assert exit_code(["verify"]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if "FAIL" in line]
    assert len(rows) == 1 and "GGN-vector product" in rows[0]


def test_verify_newton_check_catches_a_wrong_step(monkeypatch):
    right = verify.newton_step

    def wrong_step(loss, x, trust_radius=None):
        mode, cov = right(loss, x, trust_radius)
        return mode * (1 + 1e-6), cov

    monkeypatch.setattr(verify, "newton_step", wrong_step)
    results = verify.check_newton_steps(torch.device("cpu"), torch.float64, 1e-9)
    assert len(results) == 8 and not any(r.passed for r in results)


def test_verify_reports_an_error_as_a_failure(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(curvkit, "ggn_matrix", broken)
    results = verify.check_case(make_case("mlp"), 1e-9, 1e-9)
    failed = [r for r in results if not r.passed]
    assert [(r.quantity, r.note) for r in failed] == [("dense GGN", "RuntimeError")]
    assert "boom" in capsys.readouterr().err


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_bench_runs_entry_points_and_scripts(tmp_path, capfd):
    write(
        tmp_path / "bench_rows.py",
        """
        def run(quick):
            return [{"case": "mlp", "curvkit_s": 0.5, "peer_s": 1.5, "ratio": 3.0, "quick": quick}]
        """,
    )
    write(tmp_path / "bench_script.py", "import sys\nprint('script ran', sys.argv[1:])\n")
    write(tmp_path / "helper.py", "raise AssertionError('not a benchmark: never run')\n")
    assert exit_code(["bench", "--quick", "--dir", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert "case  curvkit_s  peer_s  ratio  quick" in out
    assert "mlp   0.5        1.5     3      True" in out
    assert "script ran ['--quick']" in out


def test_bench_failure_and_selection(tmp_path, capsys):
    write(tmp_path / "bench_good.py", "def run(quick):\n    return [{'x': 1.0}]\n")
    write(tmp_path / "bench_bad.py", "def run(quick):\n    raise RuntimeError('peer broke')\n")
    assert exit_code(["bench", "good", "--dir", str(tmp_path)]) == 0
    assert exit_code(["bench", "--dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "peer broke" in captured.err and "failed: bench_bad.py" in captured.err
    assert exit_code(["bench", "nonexistent", "--dir", str(tmp_path)]) == 1
    assert "available: bench_bad, bench_good" in capsys.readouterr().err


def test_bench_missing_directory(tmp_path, capsys):
    assert exit_code(["bench", "--dir", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_bench_without_a_checkout(tmp_path, monkeypatch, capsys):
    from curvkit.cli import bench

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench.curvkit, "__file__", str(tmp_path / "site" / "curvkit" / "x.py"))
    assert exit_code(["bench"]) == 1
    assert "clone of the curvkit repository" in capsys.readouterr().err


def test_bench_finds_the_repository_benchmarks(monkeypatch, tmp_path):
    from curvkit.cli import bench

    monkeypatch.chdir(tmp_path)  # found next to the package, not only from the clone's root
    directory = bench.locate_benchmarks(None)
    scripts = [script.name for script in bench.select_scripts(directory, [])]
    assert "bench_ggn.py" in scripts
    assert all(name.startswith("bench_") and name.endswith(".py") for name in scripts)


@pytest.mark.slow
def test_bench_quick_smoke(monkeypatch, capfd):
    """The quickest real benchmark end to end (the others' quick modes take minutes on 2 cores)."""
    pytest.importorskip("pyro")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert exit_code(["bench", "--quick", "newton"]) == 0
    out = capfd.readouterr().out
    assert "== bench_newton.py (quick) ==" in out and "ratio" in out


def test_demo_without_scikit_learn_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    assert exit_code(["demo", "--out", str(tmp_path), "--no-figures"]) == 1
    assert "--data synthetic" in capsys.readouterr().err


def test_demo_without_matplotlib_says_what_to_do(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert exit_code(["demo", "--data", "synthetic", "--out", str(tmp_path)]) == 1
    assert "--no-figures" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # failed before any work


def test_diagonal_figure_counts_exact_zeros_instead_of_clamping_them(tmp_path):
    from curvkit.cli import figures

    diagonal = {
        "0.weight": np.array([0.0, 0.0, 0.0, 1e-3, 1e-1]),
        "0.bias": np.array([0.5, 2.0]),
        "2.bias": np.zeros(3),
    }
    figure = figures.plot_diagonal(diagonal, tmp_path / "d.png")
    (axes,) = figure.axes
    labels = [tick.get_text() for tick in axes.get_xticklabels()]
    assert labels == ["0.weight\n(5, 3 zero)", "0.bias\n(2)", "2.bias\n(3, 3 zero)"]
    # The lower whisker of 0.weight is its smallest positive entry, not a clamped zero.
    assert axes.get_ylim()[0] <= -3 < axes.get_ylim()[0] + 1


def test_training_figure_has_a_wall_clock_view(tmp_path):
    from curvkit.cli import figures

    history = {"train_loss": [2.0, 1.0], "test_accuracy": [0.1, 0.8], "seconds": [0.0, 3.0]}
    figure = figures.plot_training({"Adam": history}, tmp_path / "t.png")
    time_axes = figure.axes[2]
    assert time_axes.get_xscale() == "log"
    assert "wall clock" in time_axes.get_xlabel()
    assert list(time_axes.lines[0].get_xdata()) == [3.0]
