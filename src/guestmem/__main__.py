"""``python -m guestmem``: the ``guestmem`` command."""

import sys

from guestmem.tools.cli import main

sys.exit(main())
