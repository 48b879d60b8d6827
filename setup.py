"""Build the native core; everything else lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["src/guestmem/_build.py:ffibuilder"])
