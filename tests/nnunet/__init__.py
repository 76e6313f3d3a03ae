"""Tests of `lovasz_monai.nnunet`."""
