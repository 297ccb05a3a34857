"""The benchmarks' environment knobs (``KVMCOAL_BENCH_*``), read and checked once."""

from __future__ import annotations

import os


def env_count(name: str, default: int, least: int = 1) -> int:
    """The integer in environment variable *name*, else *default*; at least *least*.

    A bad value stops the run at import with a message naming the
    variable, rather than an unexplained failure deep in a benchmark.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: must be an integer (default {default})") from None
    if value < least:
        raise ValueError(f"{name}={value}: must be at least {least} (default {default})")
    return value
