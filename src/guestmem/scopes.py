"""Scopes in which the calling thread's own accesses to tagged memory are unchecked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from guestmem._native import (
    unchecked_enter,
    unchecked_exit,
    unchecked_thread_enter,
    unchecked_thread_exit,
)


@contextmanager
def unchecked() -> Iterator[None]:
    """Set PSTATE.TCO for the calling thread for the scope; scopes nest.

    Cheap (one instruction each way) and per thread: other threads keep
    checking. Not for system calls: the kernel checks user memory with TCO=0.
    """
    unchecked_enter("unchecked()")
    try:
        yield
    finally:
        unchecked_exit("unchecked() exit")


@contextmanager
def unchecked_thread() -> Iterator[None]:
    """Turn tag checks off for the calling thread (prctl PR_MTE_TCF_NONE) for the scope.

    Two system calls per outermost scope; safe around system calls. The
    thread's previous mode comes back at exit; scopes nest.
    """
    unchecked_thread_enter("unchecked_thread()")
    try:
        yield
    finally:
        unchecked_thread_exit("unchecked_thread() exit")
