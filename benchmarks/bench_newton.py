"""Batched Newton steps: curvkit.ops.newton against pyro.ops.newton, in one run.

For every (D, batch size, trust radius) the script times one full Newton step (loss forward,
gradient, Hessian, solve) of each library on the same non-quadratic convex loss, interleaving the
two libraries' repetitions and keeping the fastest of each (the least disturbed by other load), and
prints the ratio curvkit / Pyro. Configurations that take well under a millisecond are sampled
for about a second instead of ``--repeats`` rounds. The time is broken down into

- gradient: forward + first backward with ``create_graph=True`` (the same code in both);
- Hessian: the D second backward passes (Pyro: ``grad(g[..., i].sum())``; curvkit: one-hot
  directions expanded over the batch);
- solve: everything else (eigenvalues for the trust region, inverse, step, checks).

Pyro has no D >= 4; for D = 4..8 the table compares curvkit against its own D = 3 step, timed
in the same interleaved rounds (so that both see the same machine state), and adds *cov write*:
the time to allocate and fill a fresh ``(N, D, D)`` tensor, the least any step that returns the
covariance pays for it (first-touch page faults dominate it on many machines).

Run: ``python benchmarks/bench_newton.py`` (``--quick`` for a short smoke run,
``--largest-only`` for the largest batch size alone, ``--device cuda`` on a GPU).
"""

import argparse
import time
from collections.abc import Callable

import pyro.ops.newton as pyro_newton
import torch
import torch.nn.functional as F

import curvkit.ops.newton as curvkit_newton


def make_loss(batch: int, dim: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Per item: softplus(w^T x) + 0.5 sum_i p_i (x_i - c_i)^2, summed over the batch."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    w, c, p = draw(batch, dim), 3 * draw(batch, dim), 0.5 + draw(batch, dim).abs()

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return F.softplus((w * x).sum(-1)).sum() + (0.5 * p * (x - c).square()).sum()

    return loss_fn


def pyro_hessian(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # The Hessian as pyro.ops.newton computes it, for the breakdown.
    rows = [
        torch.autograd.grad(g[..., i].sum(), [x], create_graph=True)[0] for i in range(x.shape[-1])
    ]
    return torch.stack(rows, -1)


def curvkit_hessian(g: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    basis = torch.eye(x.shape[-1], dtype=g.dtype, device=g.device)
    return [
        torch.autograd.grad(g, x, basis[i].expand_as(g), create_graph=True)[0]
        for i in range(x.shape[-1])
    ]


def stages(library: str, loss_fn, x0: torch.Tensor, trust_radius: float | None):
    """Three nested callables: gradient; gradient + Hessian; the full step."""
    step = {"pyro": pyro_newton.newton_step, "curvkit": curvkit_newton.newton_step}[library]
    hessian = {"pyro": pyro_hessian, "curvkit": curvkit_hessian}[library]

    def gradient():
        x = x0.clone().requires_grad_()
        return x, torch.autograd.grad(loss_fn(x), x, create_graph=True)[0]

    def gradient_and_hessian():
        x, g = gradient()
        return hessian(g, x)

    def full_step():
        x = x0.clone().requires_grad_()
        return step(loss_fn(x), x, trust_radius)

    return {"gradient": gradient, "hessian": gradient_and_hessian, "total": full_step}


def best_times(
    candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Fastest wall time of each callable, the callables interleaved round by round."""

    def run(function: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warm_up = sum(run(function) for function in candidates.values())
    if warm_up > 10:  # multi-second configurations: fewer rounds keep the whole run short
        repeats = min(repeats, 2)
    elif warm_up < 0.1:
        # Sub-millisecond steps: timer and scheduler noise is a large share of one sample, so
        # sample for about a second (interleaved as ever).
        repeats = max(repeats, min(300, int(1 / warm_up)))
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(repeats):
        for name, function in candidates.items():
            best[name] = min(best[name], run(function))
    return best


def measure(library_names, batch, dim, trust_radius, repeats, device, dtype, reference_dim=None):
    """Times of every library's stages; with ``reference_dim``, curvkit's full step at that
    dimension joins the same interleaved rounds (as ``result["reference"]``)."""
    loss_fn = make_loss(batch, dim, device, dtype)
    x0 = torch.zeros(batch, dim, device=device, dtype=dtype)
    candidates = {}
    for library in library_names:
        for stage, function in stages(library, loss_fn, x0, trust_radius).items():
            candidates[(library, stage)] = function
    if reference_dim is not None:
        reference_loss = make_loss(batch, reference_dim, device, dtype)
        reference_x0 = torch.zeros(batch, reference_dim, device=device, dtype=dtype)
        candidates["reference"] = stages("curvkit", reference_loss, reference_x0, trust_radius)[
            "total"
        ]
        candidates["cov write"] = lambda: torch.empty(
            batch, dim, dim, device=device, dtype=dtype
        ).fill_(0)
    times = best_times(candidates, repeats, device)
    result = {}
    for library in library_names:
        grad_t = times[(library, "gradient")]
        hess_t = max(times[(library, "hessian")] - grad_t, 0.0)
        total = times[(library, "total")]
        solve_t = max(total - times[(library, "hessian")], 0.0)
        result[library] = {"total": total, "gradient": grad_t, "hessian": hess_t, "solve": solve_t}
    if reference_dim is not None:
        result["reference"], result["cov write"] = times["reference"], times["cov write"]
    if trust_radius is not None:
        x = x0.clone().requires_grad_()
        mode, _ = curvkit_newton.newton_step(loss_fn(x), x)
        rejected = (mode - x0).norm(dim=-1) > trust_radius
        result["rejected"] = rejected.double().mean().item()
    return result


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--trust-radius", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true", help="batch sizes 1e3, 1e4 only")
    parser.add_argument(
        "--largest-only",
        action="store_true",
        help="the largest batch size only",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = [10**3, 10**4] if args.quick else [10**4, 10**5, 10**6]
    largest = batches[-1]
    if args.largest_only:
        batches = [largest]
    print(
        f"curvkit.ops.newton vs pyro.ops.newton: {device}, {args.dtype}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}, torch {torch.__version__}"
    )
    print(
        "Times in ms; 'rejected': share of items whose plain Newton step leaves the trust region."
    )
    header = (
        f"{'D':>2} {'batch':>8} {'trust':>5} | {'pyro':>9} {'curvkit':>9} {'ratio':>6} | "
        f"{'grad':>9} {'hess pyro':>9} {'hess ck':>9} {'solve py':>9} {'solve ck':>9} | rejected"
    )
    print(header)
    print("-" * len(header))
    for dim in (1, 2, 3):
        for batch in batches:
            for trust_radius in (None, args.trust_radius):
                r = measure(
                    ("pyro", "curvkit"), batch, dim, trust_radius, args.repeats, device, dtype
                )
                py, ck = r["pyro"], r["curvkit"]
                rejected = f"{r['rejected']:8.0%}" if "rejected" in r else ""
                print(
                    f"{dim:>2} {batch:>8.0e} {trust_radius or '-':>5} | {ms(py['total'])} "
                    f"{ms(ck['total'])} {ck['total'] / py['total']:6.2f} | {ms(ck['gradient'])} "
                    f"{ms(py['hessian'])} {ms(ck['hessian'])} {ms(py['solve'])} "
                    f"{ms(ck['solve'])} | {rejected}",
                    flush=True,
                )
    print()
    print(
        f"curvkit, D >= 4 at batch {largest:.0e} (Pyro has no D >= 4): ratio to curvkit's D = 3 "
        f"step in the same rounds"
    )
    header = (
        f"{'D':>2} {'trust':>5} | {'D = 3':>9} {'curvkit':>9} {'vs D=3':>6} | {'grad':>9} "
        f"{'hess':>9} {'solve':>9} {'cov write':>9} | rejected"
    )
    print(header)
    print("-" * len(header))
    for dim in range(4, 9):
        for trust_radius in (None, args.trust_radius):
            r = measure(("curvkit",), largest, dim, trust_radius, args.repeats, device, dtype, 3)
            ck = r["curvkit"]
            rejected = f"{r['rejected']:8.0%}" if "rejected" in r else ""
            print(
                f"{dim:>2} {trust_radius or '-':>5} | {ms(r['reference'])} {ms(ck['total'])} "
                f"{ck['total'] / r['reference']:6.2f} | {ms(ck['gradient'])} "
                f"{ms(ck['hessian'])} {ms(ck['solve'])} {ms(r['cov write'])} | {rejected}",
                flush=True,
            )


if __name__ == "__main__":
    main()
