"""cffi build script for the native core and, apart, the benchmarks' timing loops."""

from __future__ import annotations

import platform
from pathlib import Path

from cffi import FFI

CSRC = Path("csrc")
# One header per concern; each is also the binding's declarations, once the
# preprocessor lines (include guards, #include) are dropped.
BOUND_HEADERS = [
    "gm_status.h",
    "gm_platform.h",
    "gm_map.h",
    "gm_bounce.h",
    "gm_space.h",
    "gm_tags.h",
    "gm_route.h",
    "gm_io.h",
    "gm_kvm.h",
    "gm_stream.h",
    "gm_virtq.h",
]
SOURCES = [
    "gm_platform.c",
    "gm_fault.c",
    "gm_map.c",
    "gm_tags.c",
    "gm_bounce.c",
    "gm_route.c",
    "gm_io.c",
    "gm_kvm.c",
    "gm_space.c",
    "gm_stream.c",
    "gm_virtq.c",
]


def _root() -> Path:
    here = Path(__file__).resolve().parents[2]
    return here if (here / CSRC).is_dir() else Path.cwd()


def _declarations(header: Path) -> str:
    lines = header.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _compile_args() -> list[str]:
    args = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
    if platform.machine() in ("aarch64", "arm64"):
        args.append("-mbranch-protection=standard")
    return args


# The benchmarks' loops: an extension of their own that reaches the core
# through function pointers (csrc/gm_bench.h), so the core ships without them.
BENCH_HEADERS = ["gm_status.h", "gm_bench.h"]
BENCH_SOURCES = ["gm_bench.c"]

root = _root()
ffibuilder = FFI()
ffibuilder.cdef("\n".join(_declarations(root / CSRC / h) for h in BOUND_HEADERS))
ffibuilder.set_source(
    "guestmem._gm",
    "\n".join(f'#include "{h}"' for h in BOUND_HEADERS),
    sources=[str(CSRC / s) for s in SOURCES],
    include_dirs=[str(CSRC)],
    extra_compile_args=_compile_args(),
    libraries=["pthread"],
)

benchbuilder = FFI()
benchbuilder.cdef("\n".join(_declarations(root / CSRC / h) for h in BENCH_HEADERS))
benchbuilder.set_source(
    "guestmem.tools.bench._gmbench",
    '#include "gm_route.h"\n' + "\n".join(f'#include "{h}"' for h in BENCH_HEADERS),
    sources=[str(CSRC / s) for s in BENCH_SOURCES],
    include_dirs=[str(CSRC)],
    extra_compile_args=_compile_args(),
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(root / "build" / "cffi"), verbose=True)
    benchbuilder.compile(tmpdir=str(root / "build" / "cffi"), verbose=True)
