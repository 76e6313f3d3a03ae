"""``python -m lovasz_monai.benchmark``: runs :mod:`lovasz_monai.tools.benchmark`.

The benchmark lives in :mod:`lovasz_monai.tools.benchmark`; this module keeps the command and the
old import path working.
"""

import sys

from lovasz_monai.tools.benchmark import *  # noqa: F403
from lovasz_monai.tools.benchmark import __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
