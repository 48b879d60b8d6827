"""Stage the trimmed root of the arm64-kernel lane from the arm64 userland.

The kernel lane boots Debian's kernel with an initramfs: everything in it is
unpacked into RAM and Python runs about 40x slower than natively, so the root
holds only what the kernel-lane tests import: Python 3.11's standard library,
numpy, cffi's backend, pytest and hypothesis, libfdt (the VMM's device tree),
a shell, mount, mkdir and openssl (TLS test certificates), and the shared
libraries those need (found by walking ELF DT_NEEDED entries with readelf).

    python3 kernel_root.py USERLAND STAGE

Host Python, standard library only; the result is packed with cpio by
scripts/test-arm64-kernel.sh.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# openssl makes the TLS migration tests' certificates (tests/tls_certs.py).
PROGRAMS = [
    "usr/bin/python3.11",
    "usr/bin/dash",
    "usr/bin/mount",
    "usr/bin/mkdir",
    "usr/bin/openssl",
]
LOADER = "usr/lib/ld-linux-aarch64.so.1"
STDLIB = "usr/lib/python3.11"
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "pydoc_data"}
SITE = "usr/lib/python3/dist-packages"
SITE_PACKAGES = re.compile(
    r"^(numpy|cffi|_cffi_backend\..*|pycparser|_pytest|pytest|py\.py|pluggy|iniconfig|packaging"
    r"|attr|attrs|hypothesis|_hypothesis_.*|sortedcontainers|libfdt\.py|_libfdt\..*)(-[^/]*\.(egg|dist)-info)?$"
)
LIBRARY_DIR = "usr/lib/aarch64-linux-gnu"
SMALL_ETC = ["etc/passwd", "etc/group", "etc/nsswitch.conf", "etc/ssl/openssl.cnf"]
LINKS = {
    "bin": "usr/bin",
    "sbin": "usr/sbin",
    "lib": "usr/lib",
    "usr/bin/python3": "python3.11",
    "usr/bin/sh": "dash",
    "usr/lib/ssl/openssl.cnf": "/etc/ssl/openssl.cnf",
}
EMPTY_DIRS = ["proc", "sys", "dev", "tmp", "run", "root"]


def resolve(root: Path, relative: str) -> Path:
    """The real file behind ``relative`` inside ``root``, following symlinks there."""
    path = root
    parts = list(Path(relative).parts)
    for _ in range(64 * len(parts) + 64):
        if not parts:
            return path
        part = parts.pop(0)
        candidate = path / part
        if candidate.is_symlink():
            target = os.readlink(candidate)
            parts = list(Path(target.lstrip("/")).parts) + parts
            if target.startswith("/"):
                path = root
            continue
        path = candidate
    raise RuntimeError(f"symlink loop under {relative}")


def canonical(root: Path, relative: str) -> str:
    """``relative`` with its directories' symlinks resolved (``lib/x`` -> ``usr/lib/x``)."""
    parent, name = os.path.split(os.path.normpath(relative))
    return str(resolve(root, parent).relative_to(root) / name) if parent else name


def library_dirs(root: Path) -> list[str]:
    """Where the dynamic loader looks: the multiarch directory, then ld.so.conf.d."""
    dirs = [LIBRARY_DIR, "lib/aarch64-linux-gnu"]
    for conf in sorted((root / "etc/ld.so.conf.d").glob("*.conf")):
        for line in conf.read_text().splitlines():
            if line.startswith("/"):
                dirs.append(line.strip().lstrip("/"))
    return dirs


def needed(elf: Path) -> tuple[list[str], list[str]]:
    """The DT_NEEDED names and RUNPATH/RPATH directories of one ELF file."""
    out = subprocess.run(
        ["readelf", "-d", "-W", str(elf)], capture_output=True, text=True, check=False
    ).stdout
    names = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
    paths = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[([^\]]+)\]", out)
    return names, [p for entry in paths for p in entry.split(":")]


def is_elf(path: Path) -> bool:
    """Whether ``path`` starts with the ELF magic."""
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def python_files(root: Path) -> list[str]:
    """The standard library (minus what tests never import) and the chosen site packages."""
    chosen: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root / STDLIB):
        rel = Path(dirpath).relative_to(root)
        if rel == Path(STDLIB):
            dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP]
        chosen += [str(rel / name) for name in filenames if not name.startswith("_tkinter")]
    for entry in sorted((root / SITE).iterdir()):
        if not SITE_PACKAGES.match(entry.name):
            continue
        if entry.is_dir():
            for dirpath, _, filenames in os.walk(entry):
                rel = Path(dirpath).relative_to(root)
                chosen += [str(rel / name) for name in filenames]
        else:
            chosen.append(str(entry.relative_to(root)))
    return chosen


def find_library(root: Path, name: str, dirs: list[str]) -> str | None:
    """The first ``dir/name`` among ``dirs`` that is a file in ``root``."""
    return next((f"{d}/{name}" for d in dirs if resolve(root, f"{d}/{name}").is_file()), None)


def closure(root: Path, files: list[str]) -> dict[str, Path]:
    """Every file to stage (its path in the image -> its real file in the userland)."""
    staged: dict[str, Path] = {}
    pending = list(files)
    search = library_dirs(root)
    while pending:
        rel = canonical(root, pending.pop())
        if rel in staged:
            continue
        real = resolve(root, rel)
        if not real.is_file():
            raise FileNotFoundError(f"{rel} is not in the userland at {root}")
        staged[rel] = real
        if not is_elf(real):
            continue
        names, runpaths = needed(real)
        origin = str(Path(rel).parent)
        dirs = [p.replace("$ORIGIN", "/" + origin).lstrip("/") for p in runpaths] + search
        for name in names:
            found = find_library(root, name, dirs)
            if found is None:
                raise FileNotFoundError(f"{rel} needs {name}, found in none of {dirs}")
            pending.append(os.path.normpath(found))
    return staged


def stage(root: Path, target: Path) -> int:
    """Copy the trimmed root into ``target``; return the bytes staged."""
    if target.exists():
        shutil.rmtree(target)
    files = [*PROGRAMS, LOADER, *SMALL_ETC, *python_files(root)]
    total = 0
    for rel, real in closure(root, files).items():
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dest)
        total += dest.stat().st_size
    for link, points_to in LINKS.items():
        (target / link).parent.mkdir(parents=True, exist_ok=True)
        if not (target / link).exists():
            os.symlink(points_to, target / link)
    for name in EMPTY_DIRS:
        (target / name).mkdir(exist_ok=True)
    return total


def main(argv: list[str]) -> int:
    """Stage USERLAND's trimmed root into STAGE."""
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    total = stage(Path(argv[1]), Path(argv[2]))
    print(f"kernel root: {total / 2**20:.0f} MiB staged in {argv[2]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
