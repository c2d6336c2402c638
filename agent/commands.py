"""Commands arriving on `cmd/<name>`: validated, answered, never fatal.

Anyone on the broker can publish here, so every payload is treated as hostile: size,
encoding, JSON and fields are checked in that order and the first problem becomes the
error of the result. A handler that raises gives an error result too; the agent carries on.
New commands (the model updater's) register themselves; this module knows none of them.

A command registered `once` (rollback, snapshot: running it twice is not running it once)
and named by its sender (a `request_id`, or MQTT 5 correlation data with its response topic)
runs once: the same request again within REMEMBER_S, a sender's QoS 1 resend (the broker
forwards it as a new message) or a retry after a lost answer, gets the first answer again.
Only an answer whose command ran is remembered; the memory is this process's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from agent.contract import describe
from agent.contract.messages import CommandRequest, CommandResult

log = logging.getLogger(__name__)

R = TypeVar("R", bound=CommandRequest)
MAX_NAME = 64  # longer command names are cut in results and in their result topic
# Answers remembered for repeats: a resend comes within seconds, an operator's retry within
# minutes; later, the same name is a new request (scripts reuse fixed ids).
MAX_REMEMBERED = 256
REMEMBER_S = 600.0


class CommandError(Exception):
    """Raised by a handler to answer with an error that is the caller's fault, not a bug."""


@dataclass(frozen=True)
class _Entry(Generic[R]):
    request: type[R]
    handler: Callable[[R], dict[str, Any]]
    once: bool

    def run(self, data: dict[str, Any]) -> dict[str, Any]:
        # strict: `true` or "3.5" for a number is the caller's mistake, not 1.0 or 3.5
        return self.handler(self.request.model_validate(data, strict=True))


class Commands:
    """Registry of command handlers; `handle` turns any payload into a CommandResult."""

    def __init__(self, device_id: str, max_bytes: int) -> None:
        self.device_id = device_id
        self.max_bytes = max_bytes
        self._entries: dict[str, _Entry[Any]] = {}
        # (command, how named, name) -> (sha256 of the payload, the answer, monotonic time
        # answered), oldest first; only the MQTT network thread handles commands
        self._answered: OrderedDict[tuple[str, ...], tuple[bytes, CommandResult, float]] = (
            OrderedDict()
        )

    def register(
        self,
        name: str,
        request: type[R],
        handler: Callable[[R], dict[str, Any]],
        *,
        once: bool = False,
    ) -> None:
        """`once`: a repeat of a named request gets the first answer instead of a second run."""
        self._entries[name] = _Entry(request, handler, once)

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def handle(
        self,
        name: str,
        payload: bytes,
        *,
        retained: bool = False,
        correlation: bytes | None = None,
        reply_to: str | None = None,
    ) -> CommandResult:
        """The answer to one request. A `retained` one is refused: the broker hands it over
        again at every connect, and a command must run once. `correlation` and `reply_to`:
        MQTT 5 correlation data and response topic, which name a request without a
        request_id (correlation data means something only to its sender)."""
        command = name[:MAX_NAME]
        data: Any = None
        try:
            data = self._parse(payload)  # first, so that every error echoes its request_id
        except CommandError as exc:
            return self._result(command, data, error=str(exc))
        entry = self._entries.get(name)
        request_id = _request_id(data)
        if request_id:
            key: tuple[str, ...] | None = (command, f"request_id {request_id!r}")
        elif correlation:
            key = (command, f"correlation data {correlation!r}", reply_to or "")
        else:
            key = None
        if key is None or retained or entry is None or not entry.once:
            return self._run(entry, command, data, retained)
        now = time.monotonic()
        while self._answered and next(iter(self._answered.values()))[2] < now - REMEMBER_S:
            self._answered.popitem(last=False)
        digest = hashlib.sha256(payload).digest()
        earlier = self._answered.get(key)
        if earlier is not None:
            if earlier[0] != digest:
                return self._result(
                    command,
                    data,
                    error=f"{key[1]} was a different {command} request "
                    f"{now - earlier[2]:.0f} s ago; name each request anew",
                )
            log.info("%s with %s again (a resend or retry): answered, not run", command, key[1])
            return earlier[1]
        result = self._run(entry, command, data, retained)
        if result.ok:  # one refused did not run: its retry may
            self._answered[key] = (digest, result, now)
            if len(self._answered) > MAX_REMEMBERED:
                self._answered.popitem(last=False)
        return result

    def _run(
        self, entry: _Entry[Any] | None, command: str, data: dict[str, Any], retained: bool
    ) -> CommandResult:
        try:
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
        return CommandResult(
            device_id=self.device_id,
            command=command,
            request_id=_request_id(data),
            ok=error is None,
            error=error[:2000] if error else None,
            result=result,
        )


def _request_id(data: Any) -> str | None:
    """The request's own id, when it is one the result can echo."""
    request_id = data.get("request_id") if isinstance(data, dict) else None
    return request_id if isinstance(request_id, str) and len(request_id) <= 128 else None
