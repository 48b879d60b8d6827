"""``python -m guestmem``: the ``guestmem`` command."""

import sys

from guestmem.cli import main

sys.exit(main())
