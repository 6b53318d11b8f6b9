import pytest
import torch

from curvkit.optim import AdagradRMSProp


@pytest.mark.parametrize(("eta", "delta", "t"), [(1.0, 1e-16, 0.1), (0.3, 0.05, 0.5)])
def test_matches_hand_computation_of_advi_equations_10_and_11(eta, delta, t):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3, dtype=torch.float64, generator=gen).requires_grad_()
    optimizer = AdagradRMSProp([p], eta=eta, delta=delta, t=t)
    x = p.detach().clone()
    s = None
    for k in range(1, 7):
        g = torch.sin(3 * x) + x**2
        p.grad = g.clone()
        optimizer.step()
        # Equation 11: s_1 = g_1^2, then s_k = t g_k^2 + (1 - t) s_{k-1}.
        s = g * g if s is None else t * g * g + (1 - t) * s
        # Equation 10: rho_k = eta k^(-1/2 + delta) / (1 + sqrt(s_k)).
        x = x - eta * k ** (-0.5 + delta) * g / (1 + s.sqrt())
        torch.testing.assert_close(p.detach(), x, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_parameter_without_gradient_is_skipped():
    p, q = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    optimizer = AdagradRMSProp([p, q])
    p.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(q, torch.ones(2)) and not torch.equal(p, torch.ones(2))
    assert optimizer.step(lambda: torch.tensor(3.0)).item() == 3.0


@pytest.mark.parametrize("kwargs", [{"eta": 0.0}, {"delta": -0.1}, {"t": 0.0}, {"t": 1.5}])
def test_invalid_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        AdagradRMSProp([torch.zeros(1, requires_grad=True)], **kwargs)


def test_sparse_gradient_raises():
    p = torch.zeros(3, requires_grad=True)
    optimizer = AdagradRMSProp([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()
