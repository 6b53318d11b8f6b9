"""Filters for warnings that a peer's own code raises in the tests that run that peer.

Each filter names one exact message and is applied only to the tests (or modules) that run the
peer, so the same message raised anywhere else, by curvkit's own code in particular, still shows.
"""

import pytest

#: BackPACK's ``extend()`` registers full backward hooks on every module. When the model's input
#: does not require grad, torch notes that such a hook fires with respect to the module's outputs
#: only; that is all BackPACK's hooks need, so the notice is expected whenever an extended model
#: runs backward (through BackPACK, ViViT or curvkit's ViViT classes) and says nothing of curvkit.
BACKPACK_FULL_BACKWARD_HOOK = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing when gradients are computed with respect to module "
    "outputs since no inputs require gradients:UserWarning"
)

#: curvlinops' products run forward-mode AD, whose decompositions torch compiles with
#: ``torch.jit.script`` on first use, which torch 2.13 warns is deprecated: torch's internals,
#: reached through the peer's code.
CURVLINOPS_JIT_SCRIPT = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.script` is deprecated:DeprecationWarning"
)

#: laplace-torch's ``optimize_prior_precision`` reminds its users, on every call, that its default
#: link approximation is the probit one: the peer's own notice, not curvkit's.
LAPLACE_TORCH_PROBIT_NOTICE = pytest.mark.filterwarnings(
    r"ignore:By default `link_approx` is `probit`:UserWarning"
)
