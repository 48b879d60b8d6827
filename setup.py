"""Build the native core and the benchmarks' loops; everything else is in pyproject.toml."""

from setuptools import setup

setup(
    cffi_modules=[
        "src/guestmem/_build.py:ffibuilder",  # the core: guestmem._gm
        "src/guestmem/_build.py:benchbuilder",  # timing loops: guestmem.tools.bench._gmbench
    ]
)
