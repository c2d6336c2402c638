"""Secrets out of what gets printed: stream URLs carry passwords and tokens."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

_SECRET_PARAM: Final = re.compile(
    r"(?i)((?:^|&)[^=&]*(?:pass|pwd|token|secret|key|auth)[^=&]*=)[^&]*"
)


def mask_uri(uri: str) -> str:
    """The uri with its password and secret-looking query values as ***, fit for logs."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username}:***@{host}")
    return parts._replace(query=_SECRET_PARAM.sub(r"\1***", parts.query)).geturl()
