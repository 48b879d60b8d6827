"""virtio-blk request rate over guestmem.virtio: a synthetic driver, a Python device.

python benchmarks/bench_virtio.py [--json virtio.json] [--requests N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import sys

from guestmem.tools.bench import virtio_blk


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE", help="write the figures to this file")
    p.add_argument("--requests", type=int, default=32768, help="requests per run")
    p.add_argument("--repeats", type=int, default=5, help="runs per figure (median)")
    p.add_argument("--tags", default="auto", help="tag mode: auto, software, hardware, none")
    args = p.parse_args(argv)
    report = virtio_blk.run(requests=args.requests, repeats=args.repeats, mode=args.tags)
    virtio_blk.print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
