"""``python -m vit2cbsa.cli``: the ``vit2cbsa`` command."""

import sys

from .main import main

sys.exit(main())
