"""The allocator settings apply where the C library is glibc (the devices' and CI's)."""

from __future__ import annotations

import platform

from agent.memory import tune_malloc


def test_tune_malloc_applies_exactly_on_glibc() -> None:
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")
