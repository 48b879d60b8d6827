"""virtio-blk request rate over guestmem.virtio: the same as ``guestmem bench --virtio-blk``.

python benchmarks/bench_virtio.py [--json virtio.json] [--requests N] [--modes software]
"""

from __future__ import annotations

import sys

from guestmem.tools.cli import main as cli_main


def main(argv: list[str]) -> int:
    return cli_main(["bench", "--virtio-blk", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
