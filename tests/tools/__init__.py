"""Tests of `lovasz_monai.tools`."""
