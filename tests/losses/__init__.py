"""Tests of `lovasz_monai.losses`."""
