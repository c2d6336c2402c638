"""Configuration: a wrong key or value stops the agent at start, naming file and field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.config import AgentConfig, ConfigError, ModelConfig, commented_defaults
from agent.signing import key_id, trusted_keys
from tests.broker import Pki

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[mqtt]\nprot = 1\n", "mqtt.prot: Extra inputs are not permitted"),
        ("[mqtt]\nport = 70000\n", "mqtt.port: Input should be less than or equal to 65535"),
        ('[source]\nkind = "webcam"\n', "source.kind: Input should be 'camera', 'stream'"),
        ("[mqtt.tls]\nenabled = 3\n", "mqtt.tls.enabled: Input should be a valid boolean"),
        ("[outbox]\nmax_messages = 1\n", "outbox.max_messages: Input should be greater than"),
        ("[outbox]\nmax_messages = 20\n", "outbox.max_messages (20) must exceed mqtt.inflight"),
        ('[mqtt]\ntopic_prefix = "a/#/"\n', "mqtt.topic_prefix: MQTT wildcard '#'"),
        (
            "[classifier]\nmin_region_score = 1.5\n",
            "classifier.min_region_score: Input should be less than or equal to 1",
        ),
        ("colour = 1\n", "colour: Extra inputs are not permitted"),
        (
            '[model]\nregistry = "s3://models/r"\n',
            "model: registry is set and require_signature is true, but public_keys",
        ),
        ("[mqtt\n", "not valid TOML"),
        (
            '[source]\ncamera_tz = "Sydney"\n',
            "source.camera_tz: unknown time zone 'Sydney': an IANA name such as Australia/Sydney,",
        ),
        ('[source]\ncamera_tz = "+25:00"\n', "source.camera_tz: unknown time zone '+25:00'"),
        (  # in words, not the regex it failed
            '[model]\nregistry = "s3://b/x"\nchannel = "Stable"\n',
            "model.registry: should be s3://BUCKET or s3://BUCKET/PREFIX, the bucket 3 to 63 of "
            "a-z 0-9 . -; model.channel: should be a channel name: 1 to 32 of a-z 0-9 -",
        ),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, text: str, error: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert error in str(info.value)


@pytest.mark.parametrize(
    ("prefix", "error"),
    [
        ("corrosion/{device}/", "unknown placeholder '{device}' (known: {device_id})"),
        ("corrosion/{deviceid}/", "unknown placeholder '{deviceid}' (known: {device_id})"),
        ("c/{device_id}/{site}/", "unknown placeholder '{site}' (known: {device_id})"),
        ("corrosion/{device_id/", "unknown placeholder '{device_id/' (known: {device_id})"),
        ("corrosion/device_id}/", "unknown placeholder '}' (known: {device_id})"),
        ("corrosion/+/", "MQTT wildcard '+'"),
        ("corrosion/\\u0000/", "a NUL character"),
        ("$SYS/corrosion/", "starts with $"),
        ("corrosion/{device_id}", "must end with /"),
    ],
)
def test_topic_prefix_faults_name_the_setting(tmp_path: Path, prefix: str, error: str) -> None:
    """Only {device_id} is replaced: `{device}` published every message to a literal topic."""
    path = write(tmp_path, f'[mqtt]\ntopic_prefix = "{prefix}"\n')
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(path)
    assert str(info.value).startswith(f"{path}: mqtt.topic_prefix: {error}")


def test_a_topic_prefix_variable_that_is_not_utf8_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Such bytes reach Python as surrogates; paho's encode then killed the network thread."""
    monkeypatch.setenv("CORROSION_MQTT__TOPIC_PREFIX", "plant/\udcff/")
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        AgentConfig.load(None)
    assert "mqtt.topic_prefix (from CORROSION_MQTT__TOPIC_PREFIX): " in str(info.value)


@pytest.mark.parametrize(
    ("prefix", "topic"),
    [("fleet/{device_id}/rust/", "fleet/d-1/rust/"), ("plant-3/", "plant-3/"), ("/", "/")],
)
def test_topic_prefix_placeholder_anywhere_or_none(tmp_path: Path, prefix: str, topic: str) -> None:
    config = AgentConfig.load(
        write(tmp_path, f'[mqtt]\ntopic_prefix = "{prefix}"\n'), device_id="d-1"
    )
    assert config.topic_prefix() == topic


def test_whole_config_errors_name_the_fields_not_root(tmp_path: Path) -> None:
    """A check across areas printed `(root): Value error, ...`: the message names the fields."""
    path = write(tmp_path, "[outbox]\nmax_messages = 20\n")
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(path)
    assert str(info.value) == (
        f"{path}: outbox.max_messages (20) must exceed mqtt.inflight (64) "
        "with when_full = drop_oldest"
    )


def test_missing_public_key_names_the_setting(tmp_path: Path) -> None:
    """The error named the key file but not where it was configured. Config load does not
    open keys (a shipped config names one only the device has): start and check-config do."""
    pem = tmp_path / "registry.pub.pem"
    key = Ed25519PrivateKey.generate().public_key()
    pem.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    missing = tmp_path / "none.pub.pem"
    path = write(tmp_path, f'[model]\npublic_keys = ["{pem}", "{missing}"]\n')
    config = AgentConfig.load(path).model
    reason = f"{missing}: cannot read public key: No such file or directory"
    with pytest.raises(ConfigError) as info:  # run and check-config add the file: below
        trusted_keys(config)
    assert str(info.value) == f"model.public_keys: {reason}"
    assert trusted_keys(ModelConfig(public_keys=(pem,))) == {key_id(key): key}


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        AgentConfig.load(tmp_path / "nope.toml")


def test_environment_overrides_file_and_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[mqtt]\nport = 1884\nhost = "a"\n')
    monkeypatch.setenv("CORROSION_MQTT__PORT", "8883")
    monkeypatch.setenv("CORROSION_DEVICE_ID", "drone-9")
    config = AgentConfig.load(path)
    assert (config.mqtt.port, config.mqtt.host, config.device_id) == (8883, "a", "drone-9")
    assert config.topic_prefix() == "corrosion/drone-9/"
    monkeypatch.setenv("CORROSION_MQTT__PORT", "x")
    with pytest.raises(ConfigError, match=r"mqtt\.port \(from CORROSION_MQTT__PORT\)"):
        AgentConfig.load(path)


def test_one_rate_window_set_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[upload.limits.flagged] per_minute = 5` left per_hour and per_day unset: no limit."""
    path = write(tmp_path, "[upload.limits.flagged]\nper_minute = 5\n")
    monkeypatch.setenv("CORROSION_UPLOAD__LIMITS__SAMPLE__PER_DAY", "7")
    limits = AgentConfig.load(path).upload.limits
    assert limits.flagged.model_dump() == {"per_minute": 5, "per_hour": 600, "per_day": 5000}
    assert limits.sample.model_dump() == {"per_minute": 2, "per_hour": 20, "per_day": 7}


@pytest.mark.parametrize(
    ("var", "value", "error"),
    [
        ("CORROSION_MQQT__HOST", "b", "CORROSION_MQQT__HOST: names no setting (known: "),
        ("CORROSION_MQTT__HOTS", "b", "known: CORROSION_MQTT__ENABLED, CORROSION_MQTT__HOST,"),
        ("CORROSION_MQTT__TLS__CA", "/ca.pem", "CORROSION_MQTT__TLS__CA_FILE"),
        ("CORROSION_DEVICE_ID__X", "1", "CORROSION_DEVICE_ID__X: names no setting"),
        ("CORROSION_SOURCE__EXTENSIONS", ".jpg", "source.extensions is written as JSON, e.g. ["),
        ("CORROSION_SOURCE__EXTENSIONS", "[1]", "source.extensions.0 (from CORROSION_SOURCE__EX"),
        ("CORROSION_MQTT__TLS", "{", 'mqtt.tls is written as JSON, e.g. {"enabled": true}'),
    ],
)
def test_environment_faults_name_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, error: str
) -> None:
    """A misspelt override was ignored (the device ran on the file's broker); a list took
    an error that named neither the variable nor the field."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        AgentConfig.load(write(tmp_path, ""))
    assert error in str(info.value)


def test_a_variable_inside_one_that_sets_its_whole_area_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORROSION_MQTT__TLS", "null")
    monkeypatch.setenv("CORROSION_MQTT__TLS__CA_FILE", "/ca.pem")
    with pytest.raises(ConfigError, match=r"CORROSION_MQTT__TLS__CA_FILE: CORROSION_MQTT__TLS "):
        AgentConfig.load(write(tmp_path, ""))


def test_flags_beat_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[source]\nexit_when_done = false\nkind = "glob"\n')
    monkeypatch.setenv("CORROSION_SOURCE__EXIT_WHEN_DONE", "false")
    monkeypatch.setenv("CORROSION_SOURCE__EXTENSIONS", '[".png"]')
    monkeypatch.setenv("CORROSION_MQTT__TLS", '{"enabled": true}')
    config = AgentConfig.load(path, source={"exit_when_done": True})
    assert config.source.exit_when_done and config.source.kind == "glob"
    assert config.source.extensions == (".png",) and config.mqtt.tls.enabled


def _check_config(path: Path, model: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CORROSION_MODEL__PATH": str(model)},
    )


def test_check_config_masks_secrets(tmp_path: Path, logistic_model: Path) -> None:
    path = write(tmp_path, '[mqtt]\nusername = "u"\npassword = "hunter2"\n')
    out = _check_config(path, logistic_model)
    assert "hunter2" not in out.stdout + out.stderr
    stream = write(tmp_path, '[source]\nkind = "stream"\nuri = "rtsp://cam:pw123@h/s?token=t0k"\n')
    shown = _check_config(stream, logistic_model).stdout
    assert "pw123" not in shown and "t0k" not in shown and "rtsp://cam:***@h/s" in shown
    assert json.loads(out.stdout)["mqtt"]["password"] == "**********"
    bad = write(tmp_path, "[mqtt]\nprot = 1\n")
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2 and "mqtt.prot" in res.stderr and "Traceback" not in res.stderr


def test_check_config_warns_of_a_bundled_model_not_installed_yet(tmp_path: Path) -> None:
    """DEPLOY checks the config before the model is copied into the state dir, where the
    service resolves a relative model.path: not there from this shell is no error."""
    res = _check_config(write(tmp_path, "[mqtt]\nenabled = false\n"), Path("not-here"))
    assert "warning: model.path: not-here: no model manifest here (looked for relative to " in (
        res.stderr
    )
    assert res.stderr.endswith(": OK\n")


def test_check_config_warns_a_registry_device_of_its_missing_first_model(tmp_path: Path) -> None:
    """It said OK, and `run` then stopped: a registry device serves the bundled model until
    it has stored a registry version."""
    registry = '[model]\nregistry = "s3://fleet-models/p"\nrequire_signature = false\n'
    text = "[mqtt]\nenabled = false\n" + registry
    res = _check_config(write(tmp_path, text), Path("not-here"))
    assert "warning: model.path: not-here: no model manifest here" in res.stderr
    assert "run needs it there until a registry version is stored" in res.stderr


def test_shipped_configs_are_valid() -> None:
    files = sorted((ROOT / "config").glob("*.toml"))
    assert {f.name for f in files} >= {
        "agent.toml",
        "drone.toml",
        "gateway.toml",
        "aws-iot-core.toml",
    }
    for f in files:
        AgentConfig.load(f)


def test_agent_toml_is_the_generated_defaults() -> None:
    assert (ROOT / "config" / "agent.toml").read_text() == commented_defaults(), "run make config"
    # and the commented defaults are exactly the defaults
    defaults = AgentConfig.load(ROOT / "config" / "agent.toml", device_id="x")
    assert defaults == AgentConfig(device_id="x")


def test_faults_in_what_the_config_names_name_the_setting_and_the_file(
    tmp_path: Path, logistic_model: Path, pki: Pki
) -> None:
    """ssl's own errors name neither the file nor the setting (FileNotFoundError without a
    path, `[SSL] PEM lib`); check-config passed a CA that does not exist."""
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("not a certificate\n")
    (tmp_path / "frames").mkdir()
    model = (
        f'[model]\npath = "{logistic_model.parent}"\n'
        f'[source]\nkind = "folder"\nuri = "{tmp_path}/frames"\n'
    )
    cases = [
        ("check-config", f'[mqtt.tls]\nenabled = true\nca_file = "{tmp_path}/none.pem"\n',
         f"mqtt.tls.ca_file ({tmp_path}/none.pem): No such file or directory"),
        ("run", f'{model}[mqtt.tls]\nenabled = true\nca_file = "{tmp_path}/none.pem"\n',
         f"mqtt.tls.ca_file ({tmp_path}/none.pem): No such file or directory"),
        ("run", f'{model}[mqtt.tls]\nenabled = true\ncert_file = "{bogus}"\n'
         f'key_file = "{pki.client_key}"\n',
         f"mqtt.tls (cert_file {bogus}, key_file {pki.client_key}): [SSL]"),
        ("check-config", f'[mqtt.tls]\nenabled = true\nca_file = "{bogus}"\n',
         f"mqtt.tls (ca_file {bogus}): "),  # parsed, as run parses it: not only opened
        ("check-config", f'[model]\npublic_keys = ["{tmp_path}/none.pub.pem"]\n',
         f"model.public_keys: {tmp_path}/none.pub.pem: cannot read public key: No such file"),
        ("run", model.replace("[model]\n", f'[model]\npublic_keys = ["{tmp_path}/none.pub.pem"]\n'),
         f"model.public_keys: {tmp_path}/none.pub.pem: cannot read public key: No such file"),
        ("run", f'state_dir = "{bogus}/state"\n{model}',
         f"state_dir ({bogus}/state): Not a directory"),
        ("check-config", f'[model]\npath = "{bogus}"\n',
         f"model.path: {bogus}: invalid manifest: "),
        ("run", model.replace(str(logistic_model.parent), f"{tmp_path}/nomodel"),
         f"model.path: {tmp_path}/nomodel: no model manifest here"),
        ("run", model.replace(str(logistic_model.parent), f"{tmp_path}/nomodel").replace(
            "[model]\n", '[model]\nregistry = "s3://fleet-models/p"\nrequire_signature = false\n'),
         f"model.path: {tmp_path}/nomodel: no model manifest here (a registry device serves "
         "it until it has stored a version)"),
        ("run", model.replace('"folder"', '"glob"').replace("/frames", "/framez/*.jpg"),
         f"source.uri: {tmp_path}/framez/*.jpg: matches no image files"),
        ("run", model.replace(str(logistic_model.parent), str(bogus)),
         f"model.path: {bogus}: invalid manifest: "),
        ("run", f'state_dir = "{tmp_path}/st"\n{model}',
         f"state_dir: cannot open the seen-files record {tmp_path}/st/seen-files.sqlite: "),
    ]  # fmt: skip
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "seen-files.sqlite").write_text("not a database, nor the source's fault")
    for command, text, error in cases:
        config = write(tmp_path, text)
        res = subprocess.run(
            [sys.executable, "-m", "agent.cli", command, "--config", str(config)]
            if command == "run"
            else [sys.executable, "-m", "agent.cli", command, str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            cwd=tmp_path,  # the default state_dir is relative: keep it out of the checkout
        )
        assert res.returncode == 2 and error in res.stderr, (text, res.stderr)
        assert res.stderr.startswith(f"error: {config}: ") and "Traceback" not in res.stderr
