"""pytest collects the package's doctests too (``testpaths``); ``lovasz_monai.nnunet`` imports
nnunetv2, an optional extra, so its modules are collected only where nnunetv2 is installed
(``tests/nnunet/test_nnunet.py`` says the same with ``importorskip``)."""

from importlib.util import find_spec

collect_ignore = [] if find_spec("nnunetv2") else ["lovasz_monai/nnunet"]
