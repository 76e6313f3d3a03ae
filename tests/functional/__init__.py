"""Tests of `lovasz_monai.functional`."""
