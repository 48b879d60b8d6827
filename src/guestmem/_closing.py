"""A context manager whose exit closes the object."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

T = TypeVar("T", bound="ClosesOnExit")


class ClosesOnExit:
    """Mixin: ``with obj:`` calls ``obj.close()`` at exit, exception or not."""

    def close(self) -> None:
        """Release what the object holds (subclasses define it)."""
        raise NotImplementedError

    def __enter__(self: T) -> T:
        """Return the object itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the object."""
        self.close()
