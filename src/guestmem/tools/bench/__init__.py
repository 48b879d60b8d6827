"""The route comparison behind ``guestmem bench``.

Every route in every tag mode here, beside a plain memcpy between untagged
buffers (the baseline) and one on guest memory with checks off, measured in
the same run. Two layers: ``native`` (clock_gettime around a loop inside the
core) and ``python`` (one call per access, the binding's fixed cost
included). Figures are medians of 11 or more repeats in GB/s (10^9 bytes per
second), with their spread (max - min) and their ratio to the baseline.
"""

from __future__ import annotations

from guestmem.tools.bench.host import last_level_cache, where_it_ran
from guestmem.tools.bench.model import BASELINE, CASE_NAMES, CASES, SCHEMA, Case, Report, Result
from guestmem.tools.bench.plot import plot
from guestmem.tools.bench.render import print_report, print_table
from guestmem.tools.bench.runner import MIN_REPEATS, run

__all__ = [
    "BASELINE",
    "CASES",
    "CASE_NAMES",
    "MIN_REPEATS",
    "SCHEMA",
    "Case",
    "Report",
    "Result",
    "last_level_cache",
    "plot",
    "print_report",
    "print_table",
    "run",
    "where_it_ran",
]
