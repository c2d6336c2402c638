"""Model updates from a registry over real HTTP (moto's server): ten bad models refused
while the old one serves, rollback, and pinning after a rollback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from agent.config import ModelConfig
from agent.engine.classifier import ColourModel, ServingModel
from agent.engine.detector import Detector
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
