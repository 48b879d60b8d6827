"""The route comparison, as a script: the same as ``guestmem bench [ARGS]``.

python benchmarks/bench_routes.py --full --json routes.json --plot routes.png
"""

from __future__ import annotations

import sys

from guestmem.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
