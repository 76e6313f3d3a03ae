"""Lovász-Softmax / Lovász-hinge losses for MONAI, and a Lightning stack to train with them."""

__version__ = "0.1.0"
