"""Test-session settings shared by every test module."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # ``pytest -n 2`` on a 2-core machine: one torch thread per worker, or the two workers'
    # thread pools fight over the cores and every compute-bound test gets slower.
    torch.set_num_threads(1)
