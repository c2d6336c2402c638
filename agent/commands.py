"""Commands arriving on `cmd/<name>`: validated, answered, never fatal.

Anyone on the broker can publish here, so every payload is treated as hostile: size,
encoding, JSON and fields are checked in that order and the first problem becomes the
error of the result. A handler that raises gives an error result too; the agent carries on.
New commands (the model updater's) register themselves; this module knows none of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from agent.contract import describe
from agent.contract.messages import CommandRequest, CommandResult

log = logging.getLogger(__name__)

R = TypeVar("R", bound=CommandRequest)
MAX_NAME = 64  # longer command names are cut in results and in their result topic


class CommandError(Exception):
    """Raised by a handler to answer with an error that is the caller's fault, not a bug."""


@dataclass(frozen=True)
class _Entry(Generic[R]):
    request: type[R]
    handler: Callable[[R], dict[str, Any]]

    def run(self, data: dict[str, Any]) -> dict[str, Any]:
        # strict: `true` or "3.5" for a number is the caller's mistake, not 1.0 or 3.5
        return self.handler(self.request.model_validate(data, strict=True))


class Commands:
    """Registry of command handlers; `handle` turns any payload into a CommandResult."""

    def __init__(self, device_id: str, max_bytes: int) -> None:
        self.device_id = device_id
        self.max_bytes = max_bytes
        self._entries: dict[str, _Entry[Any]] = {}

    def register(self, name: str, request: type[R], handler: Callable[[R], dict[str, Any]]) -> None:
        self._entries[name] = _Entry(request, handler)

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def handle(self, name: str, payload: bytes, *, retained: bool = False) -> CommandResult:
        """The answer to one request. A `retained` one is refused: the broker hands it over
        again at every connect, and a command must run once."""
        command = name[:MAX_NAME]
        data: Any = None
        try:
            data = self._parse(payload)  # first, so that every error echoes its request_id
            entry = self._entries.get(name)
            if entry is None:
                raise CommandError(f"unknown command {command!r}; known: {', '.join(self.names)}")
            if retained:
                raise CommandError(
                    "retained commands are not run (they would run again at every connect); "
                    "publish without retain, and clear this one with a zero-byte retained "
                    "message (never taken as a command)"
                )
            result = entry.run(data)
        except CommandError as exc:
            return self._result(command, data, error=str(exc))
        except ValidationError as exc:
            return self._result(command, data, error=f"invalid payload: {describe(exc)}")
        except Exception as exc:  # a bug in a handler must not take the agent down
            log.exception("command %s failed", command)
            return self._result(command, data, error=f"internal error: {exc}")
        return self._result(command, data, result=result)

    def _parse(self, payload: bytes) -> dict[str, Any]:
        if len(payload) > self.max_bytes:
            raise CommandError(f"payload is {len(payload)} bytes, the limit is {self.max_bytes}")
        if not payload.strip():
            return {}
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(f"payload is not UTF-8 text (byte {exc.start})") from None
        try:
            data = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
            raise CommandError(f"payload is not JSON: {exc}") from None
        except RecursionError:
            raise CommandError("payload is not JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise CommandError(f"payload must be a JSON object, not {type(data).__name__}")
        return data

    def _result(
        self,
        command: str,
        data: Any,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> CommandResult:
        request_id = data.get("request_id") if isinstance(data, dict) else None
        if not isinstance(request_id, str) or len(request_id) > 128:
            request_id = None
        return CommandResult(
            device_id=self.device_id,
            command=command,
            request_id=request_id,
            ok=error is None,
            error=error[:2000] if error else None,
            result=result,
        )
