"""Commands arriving on `cmd/<name>`: validated, answered, never fatal.

Anyone on the broker can publish here, so every payload is treated as hostile: size,
encoding, JSON and fields are checked in that order and the first problem becomes the
error of the result. A handler that raises gives an error result too; the agent carries on.
New commands (the model updater's) register themselves; this module knows none of them.

A request that names itself (a `request_id`, or MQTT 5 correlation data) runs once: the same
request again, a sender's QoS 1 retry or the broker's redelivery after a reconnect, gets the
first answer again instead of a second rollback or snapshot.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
# Answers remembered for repeats: a retry comes within seconds, a redelivery at the next
# connect; a few hundred requests cover both at any sane command rate.
MAX_REMEMBERED = 256


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
        # (command, request id) -> (sha256 of the payload, the answer); one thread handles
        self._answered: OrderedDict[tuple[str, str], tuple[bytes, CommandResult]] = OrderedDict()

    def register(self, name: str, request: type[R], handler: Callable[[R], dict[str, Any]]) -> None:
        self._entries[name] = _Entry(request, handler)

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
    ) -> CommandResult:
        """The answer to one request. A `retained` one is refused: the broker hands it over
        again at every connect, and a command must run once. `correlation`: MQTT 5
        correlation data, which names the request when it carries no request_id."""
        command = name[:MAX_NAME]
        data: Any = None
        try:
            data = self._parse(payload)  # first, so that every error echoes its request_id
        except CommandError as exc:
            return self._result(command, data, error=str(exc))
        key = _request_id(data) or (correlation.hex() if correlation else None)
        if key is None or retained:  # a retained one is refused, and may be sent live next
            return self._run(name, command, data, retained)
        digest = hashlib.sha256(payload).digest()
        earlier = self._answered.get((command, key))
        if earlier is not None:
            if earlier[0] != digest:
                return self._result(
                    command,
                    data,
                    error=f"request {key!r} was an earlier, different {command} request; "
                    "name each request anew",
                )
            log.info("%s request %r again (a retry or redelivery): answered, not run", command, key)
            return earlier[1]
        result = self._run(name, command, data, retained)
        self._answered[command, key] = (digest, result)
        if len(self._answered) > MAX_REMEMBERED:
            self._answered.popitem(last=False)
        return result

    def _run(self, name: str, command: str, data: dict[str, Any], retained: bool) -> CommandResult:
        try:
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
