"""``python -m dsr_kernels bench`` / ``info``: the same as the ``dsr-kernels`` command."""

import sys

from dsr_kernels.cli import main

sys.exit(main())
