"""Model updates from a registry over real HTTP (moto's server): ten bad models refused
while the old one serves, rollback, and pinning after a rollback."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

from agent import updater as updates
from agent.config import ModelConfig
from agent.engine.classifier import ColourModel, ServingModel
from agent.engine.detector import Detector
from agent.engine.model import RuntimeFaultError
from agent.signing import trusted_keys
from agent.updater import ModelStore, Outcome, Updater
from tests.registry_helpers import NAME, Registry, bad_versions, train


def updater(
    reg: Registry,
    state: Path,
    detector: Detector,
    *,
    load: Callable[[Path], ServingModel] = ColourModel.load,
    **cfg: Any,
) -> Updater:
    config = ModelConfig(
        registry=reg.url.uri(),
        endpoint_url=reg.endpoint,
        region="us-east-1",
        public_keys=(reg.public,),
        **cfg,
    )
    return Updater(
        config,
        keys=trusted_keys(config),
        store=ModelStore(state / "models"),
        detector=detector,
        load=load,
        serving=lambda: detector.model.ref,
        report=lambda _o: None,
    )


def test_good_update_then_rollback_and_pin(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    assert up.check() == Outcome()  # no channel yet: nothing to do
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0")
    outcome = up.check()
    assert outcome.served is not None and outcome.served.version == "2.0.0"
    assert detector.model.ref.version == "2.0.0"
    assert up.check() == Outcome()  # ETag unchanged: one cheap round trip
    assert (tmp_path / "models" / NAME / "2.0.0" / "manifest.json").is_file()

    registry.publish(train(tmp_path / "v3", "3.0.0", 10).parent)
    registry.point("3.0.0")
    assert up.check().served is not None and detector.model.ref.version == "3.0.0"

    rolled = up._roll_back()
    assert rolled.served is not None and rolled.served.version == "2.0.0"
    assert detector.model.ref.version == "2.0.0"
    assert not (tmp_path / "models" / NAME / "3.0.0").exists()  # rolled back: freed
    up.pull()
    assert up.check() == Outcome()  # 3.0.0 is skipped until the channel moves on
    registry.publish(train(tmp_path / "v4", "4.0.0", 25).parent)
    registry.point("4.0.0")
    assert up.check().served is not None and detector.model.ref.version == "4.0.0"
    store = ModelStore(tmp_path / "models")
    assert [Path(h).parent.name for h in store.history()] == ["2.0.0", "4.0.0"]


def test_ten_bad_models_refused_old_one_serves(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    reasons = {}
    for version, (files, manifest, expected) in bad_versions(
        logistic_model.parent, registry
    ).items():
        registry.put(version, files, manifest)
        registry.point(version)
        outcome = up.check()
        assert outcome.served is None and outcome.refused is not None, version
        assert expected in outcome.refused, (version, outcome.refused)
        assert detector.model.ref.version == "1.0.0"  # the old model keeps serving
        reasons[version] = outcome.refused
        assert up.check() == Outcome()  # refused once, not retried at every poll
    assert len(set(reasons.values())) == 10
    assert not list((tmp_path / "models").glob(".incoming-*"))  # nothing left half-fetched
    assert not (tmp_path / "models" / NAME).exists()  # nothing refused was installed


def test_a_download_that_fails_once_is_fetched_at_the_next_poll(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """The pointer's ETag was kept although its version never arrived: every later poll got
    304 and the device stayed on the old model until someone promoted again."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0")
    down = [True]  # the link drops after the pointer is read, through boto3's retries

    def blip(request: Any, **_: Any) -> None:
        if down[0] and "/models/" in request.url:
            raise EndpointConnectionError(endpoint_url=request.url)

    up.s3.meta.events.register("before-send.s3.GetObject", blip)
    with pytest.raises(EndpointConnectionError):
        up.check()
    down[0] = False
    assert detector.model.ref.version == "1.0.0"
    outcome = up.check()
    assert outcome.served is not None and outcome.served.version == "2.0.0"


def test_a_pointer_names_the_model_and_channel_the_device_follows(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """A signed model of another name, or another channel's pointer, written where this
    device looks, would switch it to following that model."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    registry.publish(train(tmp_path / "other", "7.0.0", 30, name="other-model").parent)
    registry.point("7.0.0", name="other-model", signed=True)
    outcome = up.check()
    assert outcome.refused is not None and "names other-model channel stable" in outcome.refused
    assert f"channels/{NAME}/stable.json" in outcome.refused
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0", channel="beta")
    outcome = up.check()
    assert outcome.refused is not None and f"not {NAME} channel stable" in outcome.refused
    assert detector.model.ref.version == "1.0.0"


def test_signed_pointers_roll_back_unsigned_ones_only_go_forward(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """The pointer was unsigned: anyone who could write channels/ could send a fleet back to
    any version ever signed, and replay an old promotion."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector, require_signature=True)
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.publish(train(tmp_path / "v3", "3.0.0", 10).parent)
    registry.point("3.0.0")  # unsigned, forward: allowed
    assert up.check().served is not None and detector.model.ref.version == "3.0.0"

    registry.point("2.0.0")  # unsigned, back
    outcome = up.check()
    assert outcome.refused is not None
    assert "unsigned, and may not take 3.0.0 back" in outcome.refused
    assert detector.model.ref.version == "3.0.0"

    old = registry.point("2.0.0", signed=True)  # a fleet rollback, signed
    assert up.check().served is not None and detector.model.ref.version == "2.0.0"
    registry.point("3.0.0", signed=True)
    assert up.check().served is not None
    # the rollback's signed pointer, replayed: older than the last one served from
    registry.put_pointer(old)
    outcome = up.check()
    assert outcome.refused is not None and "a replay" in outcome.refused
    assert detector.model.ref.version == "3.0.0"
    # the replay check survives a restart: it is kept with the store
    again = updater(registry, tmp_path, detector, require_signature=True)
    assert again.check().refused is not None

    forged = old.model_copy(update={"promoted_at": datetime.now(UTC)})  # signature kept
    registry.put_pointer(forged)
    outcome = up.check()
    assert outcome.refused is not None and "altered after signing" in outcome.refused


def test_a_missing_file_is_named_and_tried_again(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """A deleted table read as 'registry unreachable: NoSuchKey' at every poll, naming no key."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    manifest = registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    assert manifest.table is not None
    table = f"{registry.url.prefix}/models/{NAME}/2.0.0/{manifest.table.file}"
    data = registry.s3.get_object(Bucket=registry.url.bucket, Key=table)["Body"].read()
    registry.s3.delete_object(Bucket=registry.url.bucket, Key=table)
    registry.point("2.0.0")
    outcome = up.check()
    assert outcome.refused is not None
    assert f"s3://{registry.url.bucket}/{table}: NoSuchKey" in outcome.refused
    registry.s3.put_object(Bucket=registry.url.bucket, Key=table, Body=data)  # repaired
    assert up.check().served is not None  # not remembered as refused, not 304


def test_an_onnxruntime_failure_is_tried_again_later(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime failing a verified model (a session that could not allocate) was refused
    until an operator sent pull-model; it is tried again after RUNTIME_RETRY_S."""
    detector = Detector(ColourModel.load(logistic_model))
    allocation = "Failed to allocate memory for requested buffer of size 50331648"
    failures: list[Exception] = [RuntimeException(allocation)]  # as session.run raises it
    failures.append(RuntimeFaultError(f"model.onnx: onnxruntime failed to load it: {allocation}"))

    def load(path: Path) -> ServingModel:
        if failures:
            raise failures.pop()
        return ColourModel.load(path)

    up = updater(registry, tmp_path, detector, load=load)
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0")
    now = time.monotonic()
    for _ in range(2):  # a session that could not be created, then a golden run
        outcome = up.check()
        assert outcome.refused is not None and "Failed to allocate" in outcome.refused
        assert up.check() == Outcome()  # not at every poll
        now += updates.RUNTIME_RETRY_S + 1
        monkeypatch.setattr(updates, "time", SimpleNamespace(monotonic=lambda t=now: t))
    outcome = up.check()
    assert outcome.served is not None and detector.model.ref.version == "2.0.0"


def test_a_pointer_read_cut_short_is_read_again(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """The ETag was kept before the body arrived: after a reset mid-body every poll got 304."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0")
    real = up.s3.get_object

    def cut(**kwargs: Any) -> Any:
        response = real(**kwargs)
        if kwargs["Key"].endswith("stable.json"):
            response["Body"].read = lambda *_: (_ for _ in ()).throw(ConnectionResetError())
        return response

    up.s3.get_object = cut  # type: ignore[method-assign]
    with pytest.raises(ConnectionResetError):
        up.check()
    up.s3.get_object = real  # type: ignore[method-assign]
    assert up.check().served is not None


def test_a_state_that_cannot_be_written_leaves_the_old_model_serving(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap came first: the new model served while the disk (and a reboot) said the old."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0")

    def full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ModelStore, "_write", full)
        with pytest.raises(OSError, match="No space"):
            up.check()
    assert detector.model.ref.version == "1.0.0"
    assert up.check().served is not None  # tried again once the disk has room
    assert ModelStore(tmp_path / "models").history() == [f"{NAME}/2.0.0/manifest.json"]


def test_a_rollback_that_cannot_write_is_tried_again_and_updates_go_on(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError in a rollback ended the updater thread: no update ever again. Then it was
    refused and dropped, and the next poll could install the version rolled back from: it
    stays pending (no update goes in meanwhile) and is done once the disk takes it."""
    detector = Detector(ColourModel.load(logistic_model))
    reports: list[Outcome] = []
    up = updater(registry, tmp_path, detector, poll_s=0.2)
    up.report = reports.append
    for version, margin in (("2.0.0", 40), ("3.0.0", 10)):
        registry.publish(train(tmp_path / version, version, margin).parent)
        registry.point(version)
        assert up.check().served is not None

    def full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(ModelStore, "_write", full)
        up.rollback()
        outcome = up._rolled_back()
    assert outcome.refused == (
        "rollback not done yet: [Errno 28] No space left on device; tried again until it is"
    )
    assert detector.model.ref.version == "3.0.0" and up._rollback.is_set()
    with monkeypatch.context() as m:  # the real write's error names the file (ENOSPC does not)
        m.setattr("agent.updater.replace_file", full)
        with pytest.raises(OSError, match=r"No space left on device: '.*/models/state\.json'"):
            up.store.skip("9.9.9")
    monkeypatch.setattr(ModelStore, "_write", full)
    up.start()
    try:
        time.sleep(1.0)  # tried again at each turn (0.2 s), said once (above), no update
        assert reports == [] and detector.model.ref.version == "3.0.0"
        deadline = time.monotonic() + 10
        monkeypatch.undo()  # the disk takes it: the rollback is done, then the update
        registry.publish(train(tmp_path / "v4", "4.0.0", 25).parent)
        registry.point("4.0.0")
        up.pull()
        while detector.model.ref.version != "4.0.0" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert detector.model.ref.version == "4.0.0"  # the thread lives on
        assert [o.served.version for o in reports if o.served] == ["2.0.0", "4.0.0"]
        assert next(o for o in reports if o.served).settled  # its refusal unsaid once done
    finally:
        up.stop()


def test_signed_pointers_untrusted_keys_channels_and_first_boot(
    tmp_path: Path, registry: Registry, logistic_model: Path
) -> None:
    """Review of signed pointers: an untrusted key's far-future pointer blocked every later
    signed promotion; one channel's promotion time refused another's; a device already on the
    channel's version recorded nothing, so a replay passed; stripping a signature undid a
    signed rollback."""
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector, require_signature=True)
    for version, margin in (("0.9.0", 35), ("2.0.0", 40), ("3.0.0", 10)):
        registry.publish(train(tmp_path / version, version, margin).parent)
    stale = registry.point("0.9.0", signed=True, promoted_at=datetime(2026, 1, 1, tzinfo=UTC))
    registry.publish(logistic_model.parent)
    registry.point("1.0.0", signed=True)  # first boot: the channel names the bundled version
    assert up.check() == Outcome()
    registry.put_pointer(stale)
    outcome = up.check()
    assert outcome.refused is not None and "a replay" in outcome.refused

    stranger = registry.point(
        "2.0.0",
        signed=True,
        promoted_at=datetime(2100, 1, 1, tzinfo=UTC),
        key=Ed25519PrivateKey.generate(),
    )
    outcome = up.check()  # a key nobody trusts on a signed channel: refused, nothing recorded
    assert outcome.refused is not None
    assert f"signed by key {stranger.signature.key_id}, which is not trusted" in outcome.refused  # type: ignore[union-attr]
    registry.point("3.0.0", signed=True)
    assert up.check().served is not None and detector.model.ref.version == "3.0.0"

    registry.point("2.0.0", signed=True)  # a signed fleet rollback
    assert up.check().served is not None and detector.model.ref.version == "2.0.0"
    registry.point("3.0.0")  # the 3.0.0 pointer again, its signature stripped
    outcome = up.check()
    assert outcome.refused is not None and "pointers have been signed" in outcome.refused
    assert detector.model.ref.version == "2.0.0"

    beta = updater(registry, tmp_path, detector, require_signature=True, channel="beta")
    registry.point("3.0.0", signed=True, channel="beta", at=(NAME, "beta"),
                   promoted_at=datetime(2026, 2, 1, tzinfo=UTC))  # fmt: skip
    outcome = beta.check()  # older than stable's last promotion, yet beta's first: taken
    assert outcome.served is not None and outcome.served.version == "3.0.0"


def test_a_new_version_is_on_the_device_before_the_state_names_it(
    tmp_path: Path, registry: Registry, logistic_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files were written without fsync: a power cut after state.json named the new
    version could leave it torn, and the device fell back to an older model."""
    import agent.updater as updater_module

    events: list[str] = []
    write_synced, sync_dir, write = (
        updater_module.write_synced,
        updater_module.sync_dir,
        ModelStore._write,
    )

    def synced(path: Path, data: bytes) -> None:
        write_synced(path, data)
        events.append(f"file {path.name}")

    def synced_dir(path: Path) -> None:
        sync_dir(path)
        events.append(f"dir {path.name}")

    def state(self: ModelStore, **changes: Any) -> None:
        write(self, **changes)
        events.append("state")

    monkeypatch.setattr(updater_module, "write_synced", synced)
    monkeypatch.setattr(updater_module, "sync_dir", synced_dir)
    monkeypatch.setattr(ModelStore, "_write", state)
    detector = Detector(ColourModel.load(logistic_model))
    up = updater(registry, tmp_path, detector)
    registry.publish(train(tmp_path / "v2", "2.0.0", 40).parent)
    registry.point("2.0.0")
    assert up.check().served is not None
    stored = sorted(p.name for p in (tmp_path / "models" / NAME / "2.0.0").iterdir())
    first_state = events.index("state")
    assert sorted(e[5:] for e in events[:first_state] if e.startswith("file ")) == stored
    manifest, download, store = events[first_state - 3 : first_state]
    assert manifest == "file manifest.json"  # last: its presence means every file arrived
    assert download.startswith("dir .incoming-") and store == f"dir {NAME}"
