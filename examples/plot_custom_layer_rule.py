r"""
A fast curvature rule for your own layer
========================================

curvkit computes the GGN of any ``nn.Module`` exactly. For most layers it uses a generic rule:
per-sample vector-Jacobian products of the layer alone with ``torch.func``, exact but slow
when the batch is large. ``nn.Linear``, the convolutions and ``nn.Embedding`` get hand-written
rules that never form per-sample gradients. Your own layer can get one too: a rule is a
function from the recorded call (the layer's input :math:`x` and the columns :math:`b`
backpropagated to its output) to one :class:`~curvkit.engines.Factor` per parameter, and
:func:`~curvkit.engines.register_rule` hands it to the engine.

This example writes a rule for a low-rank linear layer, checks the GGN diagonal and the dense
GGN it gives against plain ``torch.autograd``, and times it against the generic rule.
"""

# %%
# A low-rank linear layer
# -----------------------
#
# :math:`y_t = B (A x_t) + c` at every position :math:`t` of the input, with :math:`A` of shape
# ``[rank, in]`` and :math:`B` of shape ``[out, rank]``: two linear maps in a row, written as
# one module.

import time

import torch
from torch import nn

import curvkit
from curvkit.engines import (
    Decline,
    DenseFactor,
    Factor,
    KroneckerFactor,
    RuleCall,
    compute_factors,
    register_rule,
    rule_for,
)
from curvkit.testing.verify import reference_diag_ggn, reference_ggn


class LowRankLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.down = nn.Parameter(torch.randn(rank, in_features) / in_features**0.5)
        self.up = nn.Parameter(torch.randn(out_features, rank) / rank**0.5)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.down.T @ self.up.T + self.bias


# %%
# The rule
# --------
#
# For one sample and one backpropagated column :math:`b_t` at the output, the gradients are sums
# of outer products over positions:
#
# .. math::
#
#     \nabla_B = \sum_t b_t \otimes (A x_t), \qquad
#     \nabla_A = \sum_t (B^\top b_t) \otimes x_t, \qquad
#     \nabla_c = \sum_t b_t .
#
# A :class:`~curvkit.engines.KroneckerFactor` holds exactly such sums, for outputs
# ``[K, N, T, 1, O]`` and inputs ``[N, T, 1, I]``, and computes the diagonal, Gram matrix and
# products without forming a per-sample gradient. The rule declines (and the engine falls
# back to the generic rule, logging the reason at ``DEBUG`` level) when the samples are not on
# the input's first axis.


def low_rank_rule(call: RuleCall) -> dict[str, Factor]:
    module = call.module
    x = call.single_input()
    if call.input_sample_axis() != 0:
        raise Decline("the samples are not on the input's first axis")
    k, n = call.num_columns, call.num_samples
    x = x.reshape(n, -1, 1, module.in_features)
    b = call.output_grad().reshape(k, n, -1, 1, module.out_features)
    chunk = call.max_chunk_bytes
    return {
        "down": KroneckerFactor(b @ module.up, x, module.down.shape, max_chunk_bytes=chunk),
        "up": KroneckerFactor(b, x @ module.down.T, module.up.shape, max_chunk_bytes=chunk),
        "bias": DenseFactor(b.sum(dim=(2, 3)), module.bias.shape),
    }


handle = register_rule(LowRankLinear, low_rank_rule)

# %%
# Checked against autograd
# ------------------------
#
# A small model in float64, with the low-rank layer applied to a sequence (five positions per
# sample) and to a flat vector; :func:`curvkit.testing.verify.reference_diag_ggn` and
# :func:`curvkit.testing.verify.reference_ggn` build the GGN column by column with plain autograd.

torch.manual_seed(0)
model = nn.Sequential(
    LowRankLinear(8, 16, rank=3),
    nn.Tanh(),
    nn.Flatten(),
    LowRankLinear(5 * 16, 4, rank=2),
).double()
inputs = torch.randn(6, 5, 8, dtype=torch.float64)
targets = torch.randint(0, 4, (6,))
loss_fn = nn.CrossEntropyLoss()

# The factors of the low-rank layers' weights are Kronecker factors: the rule is in use.
_, factors = compute_factors(model, inputs, list(model.parameters()), lambda out: out[None])
print([type(factor).__name__ for factor in factors])
assert isinstance(factors[0], KroneckerFactor)

diagonal = curvkit.diag_ggn(model, loss_fn, (inputs, targets))
for actual, expected in zip(
    diagonal, reference_diag_ggn(model, loss_fn, inputs, targets), strict=True
):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
ggn = curvkit.ggn_matrix(model, loss_fn, (inputs, targets))
torch.testing.assert_close(
    ggn, reference_ggn(model, loss_fn, inputs, targets), rtol=1e-10, atol=1e-12
)
print(f"GGN diagonal and dense GGN ({ggn.shape[0]} x {ggn.shape[1]}) match autograd")

# %%
# How much faster
# ---------------
#
# The GGN diagonal of a wider model on a batch of 256, in float32, with the rule and (after
# removing it) with the generic rule. The numbers depend on the machine; the results agree.

torch.manual_seed(0)
wide = nn.Sequential(LowRankLinear(128, 128, rank=16), nn.Tanh(), LowRankLinear(128, 10, rank=8))
data = (torch.randn(256, 128), torch.randint(0, 10, (256,)))


def best_time(repeats: int = 3) -> tuple[float, list[torch.Tensor]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = curvkit.diag_ggn(wide, loss_fn, data)
        times.append(time.perf_counter() - start)
    return min(times), result


fast_time, fast = best_time()
handle.remove()
assert rule_for(LowRankLinear) is None
generic_time, generic = best_time()
for a, b in zip(fast, generic, strict=True):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
print(f"with the rule: {fast_time * 1e3:.1f} ms; generic rule: {generic_time * 1e3:.1f} ms")
