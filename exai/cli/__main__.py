"""``python -m exai.cli …``: the same as the ``exai`` console script."""

import sys

from exai.cli.main import main

sys.exit(main())
