"""Test-session settings shared by every test module."""

import matplotlib
import torch

# The suite runs in two pytest-xdist workers on two cores: one thread per worker avoids the
# oversubscription that makes small float64 kernels tens of times slower.
torch.set_num_threads(1)
# Examples and the CLI draw figures; never open a window.
matplotlib.use("Agg")
