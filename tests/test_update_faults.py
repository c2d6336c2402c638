"""Model updates meeting the field: a link cut mid-body, onnxruntime failing at boot, a
rollback arriving mid-download, rollbacks in a row and re-promotions, a disk filling after
the load, a broken version in the registry, folders a crash left. Real HTTP (moto)."""

from __future__ import annotations

import errno
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

from agent.commands import CommandError
from agent.config import AgentConfig
from agent.contract import ModelManifest, ModelRef
from agent.contract.messages import PullModelCommand
from agent.daemon import Agent
from agent.engine import model as engine_model
from agent.engine.classifier import ColourModel
from agent.engine.detector import Detector
from agent.updater import ModelStore, Outcome, RollbackError, Updater
from tests.httpcut import CutProxy
from tests.registry_helpers import NAME, Registry, train
from tests.test_updates import updater


def publish(registry: Registry, up: Updater, tmp: Path, *versions: str) -> None:
    """Publish, promote and install `versions` in turn."""
    for i, version in enumerate(versions):
        registry.publish(train(tmp / version, version, 40 - 10 * i).parent)
        registry.point(version, signed=True)
        assert up.check().served is not None, version


@pytest.mark.parametrize("cut", ["stable.json", "manifest.json", "model.onnx"])
def test_a_body_cut_short_is_fetched_again_not_refused(
    tmp_path: Path, registry: Registry, logistic_model: Path, cut: str
) -> None:
    """botocore checks a body's length only when a read comes back empty: a link closing
    mid-body gave a short read and no error, so the version was refused for good as a wrong
    size or hash, or (the pointer) its ETag kept and never read again."""
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0")
    proxy = CutProxy(registry.endpoint)
    registry.endpoint = proxy.url
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    proxy.cut = cut
    with pytest.raises(Exception, match="expected"):  # IncompleteReadError: a transport error
        up.check()
    proxy.cut = None
    outcome = up.check()
    assert outcome.served is not None and detector.model.ref.version == "2.0.0"
    proxy.close()


def _agent(tmp: Path, registry: Registry, model: Path) -> Agent:
    frames = tmp / "frames"
    frames.mkdir(exist_ok=True)
    config = {
        "device_id": "dev-1",
        "state_dir": str(tmp / "state"),
        "model": {
            "path": str(model),
            "registry": registry.url.uri(),
            "endpoint_url": registry.endpoint,
            "region": "us-east-1",
            "public_keys": [str(registry.public)],
        },
        "source": {"kind": "folder", "uri": str(frames)},
        "mqtt": {"enabled": False},
    }
    return Agent(AgentConfig.model_validate(config))


def _close(agent: Agent) -> None:
    """An Agent built but never run: close what it opened."""
    agent.source.close()
    agent.outbox.close()
    agent.detector.close()


def memory_short_for(
    patch: pytest.MonkeyPatch, version: str, error: type[Exception] = RuntimeError
) -> None:
    """onnxruntime failing `version`'s golden samples, as when memory is short at boot."""
    real = engine_model.PixelModel.check_golden

    def golden(model: engine_model.PixelModel) -> Any:
        if version in str(model.path):
            raise error("Failed to allocate memory for requested buffer")
        return real(model)

    patch.setattr(engine_model.PixelModel, "check_golden", golden)


@pytest.mark.parametrize("error", [RuntimeException, RuntimeError])
def test_onnxruntime_failing_at_boot_falls_back_and_keeps_the_stored_model(
    tmp_path: Path,
    registry: Registry,
    logistic_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: type[Exception],
) -> None:
    """onnxruntime's errors are not RuntimeErrors (pybind11 maps the rest to RuntimeError):
    one raised by the golden samples' run at boot stopped the agent from starting; and any
    boot failure deleted the version, though a device short of memory for a moment is no
    reason to lose a good model."""
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None
    publish(registry, agent.updater, tmp_path, "2.0.0", "3.0.0")
    _close(agent)
    memory_short_for(monkeypatch, "3.0.0", error)
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.detector.model.ref.version == "2.0.0"
    _close(agent)
    store = tmp_path / "state" / "models"
    assert (store / NAME / "3.0.0" / "manifest.json").is_file()
    monkeypatch.undo()
    agent = _agent(tmp_path, registry, logistic_model)  # memory back: 3.0.0 serves again
    assert agent.detector.model.ref.version == "3.0.0"
    _close(agent)


def test_a_rollback_asked_mid_download_goes_back_from_what_served(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """The rollback waited for the download, then undid the new version: the device landed
    on the version the operator rolled back from, and skipped the fix."""
    detector = Detector(ColourModel.load(logistic_model))
    reports: list[Outcome] = []
    up = updater(registry, tmp_path, detector, poll_s=0.2)
    up.report = reports.append
    publish(registry, up, tmp_path, "2.0.0", "3.0.0")
    registry.publish(train(tmp_path / "4.0.0", "4.0.0", 25).parent)
    registry.point("4.0.0", signed=True)

    asked: list[object] = []

    def command_arrives(request: Any, **_: Any) -> None:
        if "/4.0.0/model.onnx" in request.url and not asked:
            asked.append(up.rollback())  # from the MQTT thread, while 4.0.0 downloads

    up.s3.meta.events.register("before-send.s3.GetObject", command_arrives)
    up.start()
    try:
        deadline = time.monotonic() + 20
        while len(reports) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        up.stop()
    served = [o.served.version for o in reports if o.served]
    assert served == ["2.0.0", "4.0.0"]  # back from 3.0.0; then the channel's 4.0.0
    assert up.store.skipped() == set()  # the channel had moved on from 3.0.0


def test_rollbacks_in_a_row_stay_skipped_until_the_channel_moves(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """A second rollback forgot the first one's skip (the channel's version came back at the
    next pull or restart); a skip outlived a deliberate re-promotion."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    publish(registry, up, tmp_path, "2.0.0", "3.0.0", "4.0.0")
    for back_to in ("3.0.0", "2.0.0"):
        outcome = up._roll_back()
        assert outcome.served is not None and outcome.served.version == back_to
    assert ModelStore(tmp_path / "models").skipped() == {"3.0.0", "4.0.0"}  # survives restarts
    up.pull()
    assert up.check() == Outcome() and detector.model.ref.version == "2.0.0"
    registry.point("2.0.0", signed=True)  # the fleet follows this device back
    assert up.check() == Outcome()
    registry.point("4.0.0", signed=True)  # 4.0.0 fixed elsewhere, promoted again: meant
    outcome = up.check()
    assert outcome.served is not None and outcome.served.version == "4.0.0"
    assert up._roll_back(detector.model.ref).served is not None  # asked of what serves: done


def test_a_rollback_asked_as_an_update_swaps_in_skips_what_the_operator_saw(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """Asked after the update's last look at pending rollbacks (its state write, slow on an
    SD card): going back from the new version would undo what the operator never saw, and
    refusing lost the rollback. The version asked about is skipped; the new one serves."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    publish(registry, up, tmp_path, "2.0.0", "3.0.0")
    registry.publish(train(tmp_path / "4.0.0", "4.0.0", 25).parent)
    registry.point("4.0.0", signed=True)
    real = up.store.serve

    def serve(manifest: Path, **kwargs: Any) -> None:
        if "4.0.0" in str(manifest):
            up.rollback()  # from the MQTT thread, while 4.0.0 is being recorded
        real(manifest, **kwargs)

    up.store.serve = serve  # type: ignore[method-assign]
    assert up.check().served is not None
    outcome = up._roll_back(up._rollback_from)
    assert outcome.refused is not None and "send rollback again to leave 4.0.0" in outcome.refused
    assert detector.model.ref.version == "4.0.0" and up.store.skipped() == {"3.0.0"}


def test_a_rollback_that_cannot_start_is_refused_when_asked(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """With no earlier version on disk the request was taken, and only the retained `model`
    topic said `refused`: the command's own result read ok. What can be known when it is
    asked is refused then, and nothing is left pending; the swap stays the updater's."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    for serving in ("1.0.0", "2.0.0"):  # the bundled model; the first version installed
        if serving != "1.0.0":
            publish(registry, up, tmp_path, serving)
        with pytest.raises(RollbackError) as refused:
            up.rollback()
        assert str(refused.value) == (
            f"rollback: no earlier version on disk; {NAME} {serving} keeps serving"
        )
        assert not up._rollback.is_set() and up._rollback_from is None
    publish(registry, up, tmp_path, "3.0.0")
    assert up.rollback().version == "3.0.0"  # taken: the swap is the updater thread's
    with pytest.raises(RollbackError, match=f"one from {NAME} 3.0.0 is already pending"):
        up.rollback()  # one request, not two steps back: said, not silently merged
    outcome = up._rolled_back()  # what the updater thread does with it
    assert outcome.served is not None and outcome.served.version == "2.0.0"
    with pytest.raises(RollbackError, match=f"no earlier version on disk; {NAME} 2.0.0"):
        up.rollback()  # 2.0.0 is the oldest on disk now; nothing pending any more
    up.start()
    up.stop()
    with pytest.raises(RollbackError, match="the agent is stopping"):
        up.rollback()


def test_a_rollback_asked_mid_swap_is_left_to_the_updater_thread(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """The check reads the history and what serves as one: while the updater holds them (an
    update recorded, not swapped in yet) the request is neither refused nor waited on (MQTT's
    network thread must not wait), and the updater thread answers on `model`."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    registry.publish(train(tmp_path / "2.0.0", "2.0.0", 40).parent)
    registry.point("2.0.0", signed=True)
    real = up.store.serve
    asked: list[tuple[ModelRef, float]] = []

    def serve(manifest: Path, **kwargs: Any) -> None:
        real(manifest, **kwargs)  # 2.0.0 recorded; the bundled 1.0.0 still serves
        started = time.monotonic()
        asked.append((up.rollback(), time.monotonic() - started))  # from the MQTT thread

    up.store.serve = serve  # type: ignore[method-assign]
    assert up.check().served is not None
    ((ref, took),) = asked
    assert ref.version == "1.0.0" and took < 0.5  # taken unchecked, not refused, no wait
    outcome = up._rolled_back()
    assert outcome.refused is not None and "had already given way to" in outcome.refused
    assert detector.model.ref.version == "2.0.0" and up._rollback_from is None


def test_a_disk_full_after_the_load_leaves_nothing_behind(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[ColourModel] = []
    closed: list[ColourModel] = []

    def load(path: Path) -> ColourModel:
        model = ColourModel.load(path)
        loaded.append(model)
        monkeypatch.setattr(model, "close", lambda: closed.append(model))
        return model

    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector, load=load)
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0")
    real_mkdir = Path.mkdir

    def mkdir(path: Path, *args: Any, **kwargs: Any) -> None:
        if path.name == NAME:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OSError, match="No space"):
        up.check()
    monkeypatch.undo()

    def full(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelStore, "_write", full)  # now the state write: the step after
    with pytest.raises(OSError, match="No space"):
        up.check()
    assert not list((tmp_path / "models").glob(".incoming-*"))
    assert not (tmp_path / "models" / NAME / "2.0.0").exists()
    assert len(loaded) == 2 and closed == loaded and detector.model.ref.version == "1.0.0"


def test_a_version_missing_a_file_costs_no_download_and_names_the_object(
    tmp_path: Path, registry: Registry, logistic_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Files were fetched in order: a missing table cost a model download at every poll."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    with caplog.at_level(logging.WARNING, logger="agent.updater"):
        for _ in range(3):
            assert up.check() == Outcome()  # nothing promoted yet: said once
    missing = [r for r in caplog.records if "no channel pointer at s3://" in r.message]
    assert len(missing) == 1
    manifest = registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    key = f"{registry.url.prefix}/models/{NAME}/2.0.0/{manifest.table.file}"
    registry.s3.delete_object(Bucket=registry.url.bucket, Key=key)
    registry.point("2.0.0")
    fetched: list[str] = []
    up.s3.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: fetched.append(request.url)
    )
    outcome = up.check()
    assert outcome.refused is not None and f"{key}: NoSuchKey" in outcome.refused
    assert not [url for url in fetched if "model.onnx" in url]


def test_a_refusal_names_the_registry_object_not_a_temporary_folder(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    manifest = registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    key = f"{registry.url.prefix}/models/{NAME}/2.0.0/{manifest.model.file}"
    body = bytearray(registry.s3.get_object(Bucket=registry.url.bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # same size, other bytes
    registry.s3.put_object(Bucket=registry.url.bucket, Key=key, Body=bytes(body))
    registry.point("2.0.0")
    up = updater(registry, tmp_path, Detector(ColourModel.load(logistic_model)))
    outcome = up.check()
    assert outcome.refused is not None and f"s3://{registry.url.bucket}/{key}" in outcome.refused
    assert ".incoming-" not in outcome.refused


def test_the_store_frees_folders_no_record_names(tmp_path: Path) -> None:
    """A crash during a rollback's delete, or between moving a download in and recording it,
    left a version folder for good (a skipped version is never fetched again)."""
    root = tmp_path / "models"
    kept = root / NAME / "2.0.0"
    orphan = root / NAME / "3.0.0"
    for folder in (kept, orphan):
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
    (root / "state.json").write_text("{torn")
    ModelStore(root)  # a record that cannot be read frees nothing
    assert kept.is_dir() and orphan.is_dir()
    (root / "state.json").write_text(json.dumps({"history": [f"{NAME}/2.0.0/manifest.json"]}))
    ModelStore(root)
    assert kept.is_dir() and not orphan.exists()


def test_a_report_that_raises_ends_neither_the_updater_nor_its_rollbacks(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """The report ran outside the loop's handlers: one raising ended the updater thread, and
    every rollback after it was accepted and never done, then refused as pending forever."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector, poll_s=0.2)
    publish(registry, up, tmp_path, "2.0.0", "3.0.0", "4.0.0")

    def report(outcome: Outcome) -> None:
        raise RuntimeError("the link raised")

    up.report = report
    up.start()
    try:
        for version in ("3.0.0", "2.0.0"):
            up.rollback()
            deadline = time.monotonic() + 10
            while detector.model.ref.version != version and time.monotonic() < deadline:
                time.sleep(0.05)
            assert detector.model.ref.version == version
            while up._rollback_from is not None and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        up.stop()
        detector.close()


def test_a_rollback_never_goes_forward_to_a_version_kept_at_boot(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4.0.0 could not load at boot (memory short) and was kept for the next; 3.0.0 served.
    A rollback from 3.0.0 to 2.0.0 left 4.0.0 before it in the history, so a second rollback
    "went back" to 4.0.0, the newest version and the one that had failed."""
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None
    publish(registry, agent.updater, tmp_path, "2.0.0", "3.0.0", "4.0.0")
    _close(agent)
    memory_short_for(monkeypatch, "4.0.0")
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None and agent.detector.model.ref.version == "3.0.0"
    outcome = agent.updater._roll_back()
    assert outcome.served is not None and outcome.served.version == "2.0.0"
    assert agent.updater._roll_back() == Outcome(refused="rollback: no earlier version on disk")
    assert agent.detector.model.ref.version == "2.0.0"
    store = tmp_path / "state" / "models" / NAME
    assert sorted(p.name for p in store.iterdir()) == ["2.0.0"]
    _close(agent)


def test_a_rollback_answered_ok_and_cut_off_by_a_stop_is_done_at_the_next_start(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """`cmd/rollback` answered ok ("see model"), then SIGTERM came before the updater thread
    (busy downloading, say) reached it: the request was dropped without a word."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    publish(registry, up, tmp_path, "2.0.0", "3.0.0")
    assert up.rollback().version == "3.0.0"  # answered ok; the process ends before the thread
    pending = tmp_path / "models" / "rollback.json"
    assert json.loads(pending.read_text())["version"] == "3.0.0"

    reports: list[Outcome] = []
    restarted = updater(registry, tmp_path, detector)  # the next start, 3.0.0 serving
    restarted.report = reports.append
    with pytest.raises(RollbackError, match=f"one from {NAME} 3.0.0 is already pending"):
        restarted.rollback()
    restarted.start()
    deadline = time.monotonic() + 10
    while not reports and time.monotonic() < deadline:
        time.sleep(0.02)
    restarted.stop()
    assert [o.served.version for o in reports if o.served] == ["2.0.0"]
    assert not pending.exists() and restarted.store.skipped() == {"3.0.0"}

    # Done, and the stop came before its record went: nothing is done or said twice.
    pending.write_text(detector.model.ref.model_copy(update={"version": "3.0.0"}).model_dump_json())
    again = updater(registry, tmp_path, detector)
    assert again._rolled_back() == Outcome() and detector.model.ref.version == "2.0.0"
    assert not pending.exists()


def test_a_pending_rollback_from_a_version_kept_at_boot_is_finished_not_refused(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answered ok, cut off by a stop; at the next start 3.0.0 could not load (memory short,
    kept) and 2.0.0 served. The pending rollback only skipped 3.0.0 and said it "had already
    given way"; 3.0.0 stayed last in the history, and the boot after served it again, the
    version the operator rolled back from, for good (its channel version skipped)."""
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None
    publish(registry, agent.updater, tmp_path, "2.0.0", "3.0.0")
    assert agent.updater.rollback().version == "3.0.0"  # answered ok; a stop before the thread
    _close(agent)
    with monkeypatch.context() as patch:
        memory_short_for(patch, "3.0.0")
        agent = _agent(tmp_path, registry, logistic_model)
        assert agent.updater is not None and agent.detector.model.ref.version == "2.0.0"
        assert agent.updater._rolled_back() == Outcome()  # done: nothing refused
        assert agent.updater.store.history() == [f"{NAME}/2.0.0/manifest.json"]
        assert agent.updater.store.skipped() == {"3.0.0"}
        _close(agent)
    agent = _agent(tmp_path, registry, logistic_model)  # memory back: 2.0.0 still serves
    assert agent.detector.model.ref.version == "2.0.0" and agent.updater is not None
    assert agent.updater.check() == Outcome() and agent.detector.model.ref.version == "2.0.0"
    _close(agent)


def test_boot_never_serves_a_version_rolled_back_from(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None
    publish(registry, agent.updater, tmp_path, "2.0.0", "3.0.0")
    _close(agent)
    store = ModelStore(tmp_path / "state" / "models")
    store.skip("3.0.0")  # as a rollback the stop cut off between its two writes may leave it
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.detector.model.ref.version == "2.0.0"
    _close(agent)


def test_a_rollback_that_fails_unexpectedly_is_said_on_model_and_its_record_goes(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    publish(registry, up, tmp_path, "2.0.0", "3.0.0")
    up.rollback()
    monkeypatch.setattr(up, "_serve", lambda *a, **k: (_ for _ in ()).throw(KeyError("bug")))
    assert up._rolled_back() == Outcome(refused="rollback failed: 'bug'")
    assert not up.store.pending.exists() and up._rollback_from is None
    up.store.pending.mkdir()  # not a file: neither read nor in the way of a start
    assert updater(registry, tmp_path, detector)._rollback_from is None
    assert not up.store.pending.exists()


def test_a_pending_rollback_from_a_version_dropped_at_boot_is_done_not_sent_again(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """4.0.0 failed its hash check at the next start (a file altered on the card), was
    dropped, and 3.0.0 served: what the rollback asked. The pending rollback said "send
    rollback again to leave 3.0.0", which goes two versions back (a reviewer's finding)."""
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None
    publish(registry, agent.updater, tmp_path, "2.0.0", "3.0.0", "4.0.0")
    assert agent.updater.rollback().version == "4.0.0"  # answered ok; a stop before the thread
    _close(agent)
    folder = tmp_path / "state" / "models" / NAME / "4.0.0"
    onnx = next(p for p in folder.iterdir() if p.name != "manifest.json")
    onnx.write_bytes(onnx.read_bytes()[:-1] + bytes([onnx.read_bytes()[-1] ^ 1]))
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None and agent.detector.model.ref.version == "3.0.0"
    assert agent.updater._rolled_back() == Outcome()
    assert agent.updater.store.skipped() == {"4.0.0"}  # the channel does not bring it back
    assert agent.updater.check() == Outcome() and agent.detector.model.ref.version == "3.0.0"
    _close(agent)


def test_after_a_rollback_gave_way_the_next_goes_past_the_skipped_version(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """Asked mid-swap of 3.0.0 while 4.0.0 came in: 3.0.0 skipped, 4.0.0 serves. The
    rollback the refusal asks for went to 3.0.0, the version the operator had left, and a
    plain reboot (which never serves a skipped version) then changed the model to 2.0.0."""
    agent = _agent(tmp_path, registry, logistic_model)
    up = agent.updater
    assert up is not None
    publish(registry, up, tmp_path, "2.0.0", "3.0.0")
    registry.publish(train(tmp_path / "4.0.0", "4.0.0", 10).parent)
    registry.point("4.0.0", signed=True)
    real = up.store.serve

    def serve(manifest: Path, **kwargs: Any) -> None:
        real(manifest, **kwargs)  # 4.0.0 recorded, 3.0.0 still serving
        up.rollback()  # the MQTT thread, mid-swap: taken unchecked

    up.store.serve = serve  # type: ignore[method-assign]
    assert up.check().served is not None
    up.store.serve = real  # type: ignore[method-assign]
    up._rollback.clear()  # as the updater thread's loop does
    first = up._rolled_back()
    assert first.refused is not None and "send rollback again to leave 4.0.0" in first.refused
    # 3.0.0 is forgotten with its skip: a read of the unchanged pointer (4.0.0) lifts skips,
    # and one kept in the history would then be the version a rollback goes back to.
    assert up.store.history() == [f"{NAME}/{v}/manifest.json" for v in ("2.0.0", "4.0.0")]
    assert not (tmp_path / "state" / "models" / NAME / "3.0.0").exists()
    up.pull()
    assert up.check() == Outcome()
    assert up.rollback().version == "4.0.0"
    up._rollback.clear()  # as the updater thread's loop does
    second = up._rolled_back()
    assert second.served is not None and second.served.version == "2.0.0"
    registry.publish(train(tmp_path / "5.0.0", "5.0.0", 30).parent)
    registry.point("5.0.0", signed=True)  # the channel moves on: every skip lifted
    assert up.check().served is not None
    assert up.rollback().version == "5.0.0"
    up._rollback.clear()  # as the updater thread's loop does
    third = up._rolled_back()
    assert third.served is not None and third.served.version == "2.0.0"
    with pytest.raises(RollbackError, match="no earlier version on disk"):
        up.rollback()  # never forward to 3.0.0 or 4.0.0
    _close(agent)
    agent = _agent(tmp_path, registry, logistic_model)  # a plain reboot: the same model
    assert agent.detector.model.ref.version == "2.0.0"
    _close(agent)


def test_a_rollback_the_disk_refuses_stays_pending_through_a_restart(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's state could not be written (a full disk): the record went all the same,
    and the next boot served the version rolled back from (a reviewer's finding). It stays
    until done, and boot does not serve the version a pending rollback leaves."""
    agent = _agent(tmp_path, registry, logistic_model)
    up = agent.updater
    assert up is not None
    publish(registry, up, tmp_path, "2.0.0", "3.0.0")
    up.rollback()
    full = OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(ModelStore, "_write", lambda *_, **__: (_ for _ in ()).throw(full))
        outcome = up._rolled_back()
    assert outcome.refused is not None and outcome.refused.startswith("rollback not done yet")
    assert up.store.pending.exists() and up._rollback_from is not None
    _close(agent)  # stopped before the next turn
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None and agent.detector.model.ref.version == "2.0.0"
    assert agent.updater._rolled_back() == Outcome()  # done by the boot: 3.0.0 forgotten
    assert agent.updater.store.history() == [f"{NAME}/2.0.0/manifest.json"]
    assert agent.updater.store.skipped() == {"3.0.0"} and not agent.updater.store.pending.exists()
    _close(agent)


def test_a_pending_rollback_is_met_at_boot_where_it_can_be(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Boot passed over the version a pending rollback leaves: when the version it goes back
    to could not load either, the bundled model served and the rollback was called done, the
    version rolled back from freed (a reviewer's finding). And a version kept at an earlier
    boot, newer than the one the rollback leaves, served first."""
    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None
    publish(registry, agent.updater, tmp_path, "2.0.0", "3.0.0", "4.0.0")
    m = ModelManifest.read(tmp_path / "state" / "models" / NAME / "3.0.0" / "manifest.json")
    asked = ModelRef(name=m.name, version=m.version, sha256=m.model.sha256)
    agent.updater.store.ask_rollback(asked)  # asked of 3.0.0 while 4.0.0 was kept at boot
    _close(agent)
    with monkeypatch.context() as patch:
        memory_short_for(patch, "2.0.0")
        agent = _agent(tmp_path, registry, logistic_model)
        up = agent.updater
        assert up is not None and agent.detector.model.ref.version == "3.0.0"  # not 4, not 1
        with pytest.raises(CommandError, match="a rollback is pending"):
            agent.commands._entries["pull-model"].handler(PullModelCommand())
        outcome = up._rolled_back()
        assert outcome.refused is not None
        assert "Failed to allocate memory" in outcome.refused  # said on `model`
        _close(agent)
    assert (tmp_path / "state" / "models" / NAME / "3.0.0").is_dir()  # still serves

    agent = _agent(tmp_path, registry, logistic_model)
    assert agent.updater is not None
    agent.updater.store.ask_rollback(asked)  # asked again, and cut off again
    _close(agent)
    agent = _agent(tmp_path, registry, logistic_model)  # memory fine: met at boot
    assert agent.updater is not None and agent.detector.model.ref.version == "2.0.0"
    assert agent.updater._rolled_back() == Outcome()  # done: 3.0.0 and 4.0.0 forgotten
    assert agent.updater.store.history() == [f"{NAME}/2.0.0/manifest.json"]
    _close(agent)
