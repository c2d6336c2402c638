"""The allocator settings apply on glibc (the devices' and CI's C library)."""

from __future__ import annotations

import platform

import pytest

from agent.memory import tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_malloc_applies_on_glibc() -> None:
    assert tune_malloc() is True
