"""The pytest-benchmark suites' environment knobs (KVMCOAL_BENCH_*), read and checked once.

kvmcoal bench does not read them (its counts come from --scale and
--blocks); the suites in the source tree's benchmarks/ do, each at import.
"""

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


# Rounds per consumer benchmark (each round drains one batch), and untimed ones first.
ROUNDS = env_count("KVMCOAL_BENCH_ROUNDS", 5000)
WARMUP_ROUNDS = env_count("KVMCOAL_BENCH_WARMUP", 200, least=0)
# Timed calls per producer benchmark (each call makes producer.PRODUCER_BATCH writes).
PRODUCER_ROUNDS = env_count("KVMCOAL_BENCH_PRODUCER_ROUNDS", 1000)
# Paced round trips per wake-latency benchmark.
ROUND_TRIPS = env_count("KVMCOAL_BENCH_ROUND_TRIPS", 2000)
# Records per transfer.
RECORDS = env_count("KVMCOAL_BENCH_RECORDS", 200_000)
# Guest stores per real-KVM run, and timed runs per benchmark.
KVM_STORES = env_count("KVMCOAL_BENCH_KVM_STORES", 100_000)
KVM_ROUNDS = env_count("KVMCOAL_BENCH_KVM_ROUNDS", 5)

# What a smoke run (--benchmark-disable) uses instead.
SMOKE_RECORDS = 5000
SMOKE_STORES = 3000
