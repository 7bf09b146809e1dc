"""``python -m kvmslots`` is the ``kvmslots`` command."""

import sys

from .cli import main

sys.exit(main())
