"""Agent configuration: one strict pydantic model per area, TOML file plus environment.

`extra="forbid"` everywhere, so a misspelt key fails at start with the path of the field
instead of being silently ignored on a device nobody can reach. Environment variables
override the file (`CORROSION_MQTT__PORT=8883` sets `mqtt.port`) and command-line flags
override both; a `CORROSION_` variable that names no setting is an error too, naming it.
"""

from __future__ import annotations

import json
import os
import socket
import tomllib
import types
from pathlib import Path
from typing import Any, Final, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.config.areas import Area, ClassifierConfig, HealthConfig, SourceConfig, SourceKind
from agent.config.cloud import CategoryLimits, ModelConfig, RateLimit, UploadConfig
from agent.config.link import DEVICE_ID, MqttConfig, OutboxConfig, TlsConfig
from agent.contract.common import error_text
from agent.redact import mask_uri

__all__ = [
    "AgentConfig",
    "Area",
    "CategoryLimits",
    "ClassifierConfig",
    "ConfigError",
    "HealthConfig",
    "ModelConfig",
    "MqttConfig",
    "OutboxConfig",
    "RateLimit",
    "SourceConfig",
    "SourceKind",
    "TlsConfig",
    "UploadConfig",
    "commented_defaults",
    "toml_value",
]


ENV_PREFIX: Final = "CORROSION_"
_NESTED: Final = "__"


class AgentConfig(BaseModel):
    """The whole agent; `load` reads TOML, then the environment, then flags on top."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    device_id: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Device id: MQTT client id and topic part; default the host name",
    )
    state_dir: Path = Field(
        default=Path("state"), description="Outbox, seen-files record and models live here"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log level"
    )
    source: SourceConfig = Field(default_factory=SourceConfig, description="Frame source")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model")
    classifier: ClassifierConfig = Field(
        default_factory=ClassifierConfig, description="Classification"
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="Durable outbox")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health")
    upload: UploadConfig = Field(default_factory=UploadConfig, description="Uploads to S3")

    @model_validator(mode="after")
    def _outbox_outlasts_the_window(self) -> AgentConfig:
        """Messages in flight are never evicted: an outbox no larger than the window would
        be all in flight after a disconnect and refuse every new message until reconnect."""
        box, window = self.outbox, self.mqtt.inflight
        if box.when_full == "drop_oldest" and box.max_messages <= window:
            raise ValueError(
                f"outbox.max_messages ({box.max_messages}) must exceed mqtt.inflight "
                f"({window}) with when_full = drop_oldest"
            )
        return self

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> AgentConfig:
        """Read `path` (TOML), then CORROSION_* variables, then `overrides` (flags); errors
        name the file or variable and the field's dotted path."""
        data: dict[str, Any] = {}
        where = str(path) if path else "configuration"
        if path is not None:
            try:
                with path.open("rb") as fh:
                    data = tomllib.load(fh)
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        _merge(data, _environment(cls))
        _merge(data, overrides)
        try:
            return cls(**data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {_describe(exc)}") from exc

    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix.replace(DEVICE_ID, self.device_id)

    def effective(self) -> str:
        """The config as the agent will use it, secrets masked (SecretStr dumps as ***)."""
        data = self.model_dump(mode="json")
        data["source"]["uri"] = mask_uri(data["source"]["uri"])
        return json.dumps(data, indent=2)


class ConfigError(ValueError):
    """A configuration that must not start the agent; the message names file and field."""


def _describe(exc: ValidationError) -> str:
    """Like contract.describe, but names the variable a bad value came from. Our validators'
    own sentences go without pydantic's `Value error, `; a whole-config one (no field path)
    names the fields it relates, so it goes bare rather than under `(root)`."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        msg = error_text(err).removeprefix("Value error, ")
        if not loc:
            parts.append(msg)
            continue
        # The longest variable covering the field: CORROSION_SOURCE__EXTENSIONS for .0 too.
        var = next((v for n in range(len(loc), 0, -1) if (v := _var(loc[:n])) in os.environ), None)
        origin = f" (from {var})" if var else ""
        parts.append(f"{'.'.join(loc)}{origin}: {msg}")
    return "; ".join(parts)


def _environment(model: type[BaseModel]) -> dict[str, Any]:
    """CORROSION_<AREA>__<FIELD> variables as nested data. A name that is no setting fails:
    a misspelt override ignored on a device nobody can reach is worse than no start."""
    data: dict[str, Any] = {}
    for var, raw in sorted(os.environ.items()):  # CORROSION_MQTT before CORROSION_MQTT__PORT
        if not var.startswith(ENV_PREFIX):
            continue
        names = var[len(ENV_PREFIX) :].lower().split(_NESTED)
        area: type[BaseModel] | None = model
        node = data
        for depth, name in enumerate(names):
            if not isinstance(node, dict):
                whole = _var(names[:depth])
                raise ConfigError(f"{var}: {whole} sets all of {'.'.join(names[:depth])}")
            field = area.model_fields.get(name) if area else None
            if field is None:
                known = [_var([*names[:depth], f]) for f in area.model_fields] if area else []
                hint = f"known: {', '.join(known)}" if known else "a value has no parts"
                raise ConfigError(f"{var}: names no setting ({hint})")
            area = _area(field.annotation)
            if depth < len(names) - 1:
                node = node.setdefault(name, {})
            elif area is None and not _structured(field.annotation):
                node[name] = raw
            else:
                try:
                    node[name] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    example = '{"enabled": true}' if area else '[".jpg", ".png"]'
                    msg = f"{var}: {'.'.join(names)} is written as JSON, e.g. {example}: {exc}"
                    raise ConfigError(msg) from exc
    return data


def _var(names: list[str]) -> str:
    return ENV_PREFIX + _NESTED.join(names).upper()


def _area(annotation: Any) -> type[BaseModel] | None:
    """The config area a field holds (`TlsConfig`, `RateLimit | None`), or None for a value."""
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    for option in options or (annotation,):
        if isinstance(option, type) and issubclass(option, BaseModel):
            return option
    return None


def _structured(annotation: Any) -> bool:
    """A list, tuple or mapping: written in a variable as JSON."""
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    return any(
        get_origin(o) in (list, tuple, dict, set, frozenset) or o in (list, tuple, dict)
        for o in options or (annotation,)
    )


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    """Deep-merge `extra` (command-line overrides) into `base`."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def toml_value(value: Any) -> str:
    """A TOML literal for a config value (strings as JSON strings, which TOML reads)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def _render(area: BaseModel, table: str, out: list[str]) -> None:
    """Values come from a default instance: a sub-area's defaults may differ per parent."""
    nested: list[tuple[str, BaseModel]] = []
    if table:
        out += ["", f"[{table}]"]
    for name, field in type(area).model_fields.items():
        value = getattr(area, name)
        if isinstance(value, BaseModel):
            nested.append((f"{table}.{name}" if table else name, value))
            continue
        out.append(f"# {field.description}")
        if name == "device_id":  # the host name: differs per machine
            out.append(f"# {name} =  # default: computed at start")
        elif value is None:
            out.append(f"# {name} =  # default: unset")
        else:
            out.append(f"{name} = {toml_value(value)}")
    for path, sub in nested:
        _render(sub, path, out)


def commented_defaults() -> str:
    """config/agent.toml: every field with its description and default (a test keeps it true)."""
    out = [
        "# corrosion-agent configuration: every setting with its default.",
        "# Generated by `make config` from agent/config/; environment variables override",
        "# the file: CORROSION_<AREA>__<FIELD>, e.g. CORROSION_MQTT__HOST=broker.local.",
    ]
    _render(AgentConfig(device_id="unset"), "", out)
    return "\n".join(out) + "\n"
