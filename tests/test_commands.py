"""Command payloads are hostile until proven otherwise: every one gets an answer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.commands import MAX_REMEMBERED, CommandError, Commands
from agent.contract.messages import PingCommand, SetThresholdCommand, SnapshotCommand


def commands() -> Commands:
    c = Commands("dev-1", max_bytes=1024)
    c.register("ping", PingCommand, lambda _: {"pong": True})
    c.register("set-threshold", SetThresholdCommand, lambda r: {"flag_pct": r.flag_pct})

    def broken(_: PingCommand) -> dict[str, Any]:
        raise RuntimeError("boom")

    def refuse(_: PingCommand) -> dict[str, Any]:
        raise CommandError("not now")

    c.register("broken", PingCommand, broken)
    c.register("refuse", PingCommand, refuse)
    return c


def test_ok_and_request_id_echoed() -> None:
    r = commands().handle("ping", b'{"request_id": "abc"}')
    assert r.ok and r.result == {"pong": True} and r.request_id == "abc" and r.device_id == "dev-1"
    assert commands().handle("ping", b"").ok  # empty payload means {}


@pytest.mark.parametrize(
    ("name", "payload", "error"),
    [
        ("nope", b"{}", "unknown command 'nope'; known: broken, ping, refuse, set-threshold"),
        ("ping", b"x" * 2000, "payload is 2000 bytes, the limit is 1024"),
        ("ping", b"\xff\xfe{", "payload is not UTF-8 text (byte 0)"),
        ("ping", b"{nope", "payload is not JSON: Expecting property name"),
        ("ping", b"[1, 2]", "payload must be a JSON object, not list"),
        ("ping", b'{"extra": 1}', "invalid payload: extra: Extra inputs are not permitted"),
        ("set-threshold", b"{}", "invalid payload: flag_pct: Field required"),
        ("set-threshold", b'{"flag_pct": "high"}', "invalid payload: flag_pct: Input should be"),
        (
            "set-threshold",
            b'{"flag_pct": 101}',
            "invalid payload: flag_pct: Input should be less than or equal",
        ),
        ("ping", b"[" * 1000, "payload is not JSON"),
        # strict types: these were taken as 1.0 and 3.5
        ("set-threshold", b'{"flag_pct": true}', "invalid payload: flag_pct: Input should be"),
        ("set-threshold", b'{"flag_pct": "3.5"}', "invalid payload: flag_pct: Input should be"),
        ("", b"{}", "unknown command ''"),
        ("broken", b"{}", "internal error: boom"),
        ("refuse", b"{}", "not now"),
    ],
)
def test_errors_name_what_is_wrong(name: str, payload: bytes, error: str) -> None:
    r = commands().handle(name, payload)
    assert not r.ok and r.result is None
    assert r.error is not None and r.error.startswith(error), r.error


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    c = Commands("dev-1", max_bytes=1 << 20)
    c.register("ping", PingCommand, lambda _: {})
    r = c.handle("ping", b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    assert not r.ok and r.error is not None and "JSON" in r.error
    r = c.handle("ping", b'{"n": ' + b"9" * 5000 + b"}")  # was an "internal error", traceback
    assert r.error is not None and r.error.startswith("payload is not JSON: Exceeds the limit")


def test_an_integer_is_a_number_and_errors_echo_the_request_id() -> None:
    assert commands().handle("set-threshold", b'{"flag_pct": 5}').result == {"flag_pct": 5.0}
    r = commands().handle("nope", b'{"request_id": "r-7"}')  # unknown: read before the name
    assert not r.ok and r.request_id == "r-7"


def test_a_retained_command_is_refused_not_run() -> None:
    """The broker hands a retained command over again at every connect: it ran each time."""
    ran: list[object] = []
    c = Commands("dev-1", max_bytes=1024)
    c.register("ping", PingCommand, lambda r: ran.append(r) or {})
    r = c.handle("ping", b'{"request_id": "x"}', retained=True)
    assert not r.ok and r.request_id == "x" and not ran
    assert r.error is not None and r.error.startswith("retained commands are not run")


def test_request_id_of_wrong_type_is_not_echoed() -> None:
    r = commands().handle("ping", b'{"request_id": 5}')
    assert not r.ok and r.request_id is None and r.error is not None
    assert "request_id" in r.error


def test_reconnect_backoff_is_full_jitter_capped() -> None:
    from agent.backoff import full_jitter

    for attempt in range(40):
        waits = [full_jitter(attempt, 0.5, 30.0) for _ in range(200)]
        assert all(0.5 <= w <= min(30.0, 0.5 * 2**attempt) for w in waits)
    assert len({round(full_jitter(5, 0.5, 30.0), 6) for _ in range(50)}) > 40  # spread out


def counting() -> tuple[Commands, list[str]]:
    """Commands whose `snapshot` (run once) counts its runs and refuses while "busy"."""
    runs: list[str] = []
    c = Commands("dev-1", max_bytes=1024)

    def snapshot(r: SnapshotCommand) -> dict[str, Any]:
        if r.note == "busy":
            raise CommandError("busy now")
        runs.append(r.request_id or "")
        return {"run": len(runs)}

    c.register("snapshot", SnapshotCommand, snapshot, once=True)
    pings = iter(range(1_000))
    c.register("ping", PingCommand, lambda _: {"ping": next(pings)})
    return c, runs


def test_a_repeated_request_is_answered_again_not_run_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sender's QoS 1 resend (forwarded by the broker as a new message) or a retry after a
    lost answer ran a rollback or a snapshot twice: a rollback twice goes back two versions."""
    c, runs = counting()
    first = c.handle("snapshot", b'{"request_id": "r1"}')
    again = c.handle("snapshot", b'{"request_id": "r1"}')
    assert first.ok and again == first and runs == ["r1"]  # the same answer, its time too
    assert c.handle("snapshot", b'{"request_id": "r2"}').result == {"run": 2}
    assert [c.handle("snapshot", b"{}").result for _ in range(2)] == [{"run": 3}, {"run": 4}]
    # MQTT 5: correlation data names a request only together with its sender's topic.
    one = [c.handle("snapshot", b"{}", correlation=b"\x01", reply_to="a/res") for _ in range(2)]
    assert one[0] == one[1] and len(runs) == 5
    assert c.handle("snapshot", b"{}", correlation=b"\x01", reply_to="b/res").ok and len(runs) == 6
    other = c.handle("snapshot", b'{"request_id": "r1", "note": "x"}')
    assert not other.ok and other.request_id == "r1" and len(runs) == 6
    assert other.error is not None
    assert other.error.startswith("request_id 'r1' was a different snapshot request 0 s ago")
    # Commands that are not `once` (ping, status) run every time, fixed id or not.
    pings = [c.handle("ping", b'{"request_id": "p"}').result for _ in range(2)]
    assert pings == [{"ping": 0}, {"ping": 1}]  # run twice, not answered from memory
    monkeypatch.setattr("agent.commands.REMEMBER_S", 0.0)  # later, the same name is new
    assert c.handle("snapshot", b'{"request_id": "r1"}').result == {"run": 7}


def test_only_requests_that_ran_are_remembered_and_not_for_ever() -> None:
    c, runs = counting()
    refused = c.handle("snapshot", b'{"request_id": "r1"}', retained=True)
    assert not refused.ok and runs == []
    assert c.handle("snapshot", b'{"request_id": "r1"}').ok and runs == ["r1"]  # sent live
    busy = b'{"request_id": "b", "note": "busy"}'
    assert c.handle("snapshot", busy).error == "busy now"
    assert c.handle("snapshot", busy).error == "busy now"  # refused again: not remembered
    for i in range(MAX_REMEMBERED):
        c.handle("snapshot", json.dumps({"request_id": f"n{i}"}).encode())
    assert c.handle("snapshot", b'{"request_id": "r1"}').result == {"run": MAX_REMEMBERED + 2}
