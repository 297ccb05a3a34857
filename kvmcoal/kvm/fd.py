"""What Kvm, Vm and Vcpu share: each owns one fd, and closes it when dropped open."""

from __future__ import annotations

import warnings
from typing import TypeVar

_Self = TypeVar("_Self", bound="OwnsFd")


class OwnsFd:
    """Context manager use, and a close (with a ResourceWarning) when dropped open."""

    _fd = -1

    def close(self) -> None:
        raise NotImplementedError

    def _close_when_collected(self) -> None:
        self.close()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0:
            what = repr(self)
            # Closed before the warning: with warnings as errors it raises.
            self._close_when_collected()
            warnings.warn(f"unclosed {what}", ResourceWarning, source=self)
