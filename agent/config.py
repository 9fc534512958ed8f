"""Agent configuration: a TOML file validated by pydantic, every key overridable from the
environment as ``ATOLL_<SECTION>__<KEY>`` (e.g. ``ATOLL_AGENT__BROKERS='["ws://h:7400"]'``)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from atoll.eventloop import DEFAULT_IDLE_SPIN_US, MAX_IDLE_SPIN_US
from atoll.protocol.errors import ProtocolError
from atoll.protocol.subjects import check_name

ENV_PREFIX = "ATOLL_"


def check_listen(v: str) -> str:
    """``v`` if it is HOST:PORT (port 0: any free one), else ValueError saying so."""
    host, _, port = v.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{v!r} is not HOST:PORT")
    return v


def from_config_dir(value: Path, info: ValidationInfo) -> Path:
    """A relative path anywhere in a config file is relative to the file: its sections are
    validated with the file's directory as context ``config_dir`` (the plugin host passes it on
    to the plugins' own sections)."""
    value = value.expanduser()
    base = (info.context or {}).get("config_dir")
    return (Path(base) / value).resolve() if base is not None and not value.is_absolute() else value


ConfigPath = Annotated[Path, AfterValidator(from_config_dir)]

IDLE_SPIN = Field(DEFAULT_IDLE_SPIN_US, ge=0, le=MAX_IDLE_SPIN_US)


class AgentSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    data_dir: ConfigPath
    brokers: list[str] = Field(min_length=1)
    log_level: str = "INFO"
    ca_file: ConfigPath | None = None  # CA bundle for wss:// brokers with a private CA
    call_timeout: float = Field(30.0, gt=0)
    heartbeat: float = Field(5.0, gt=0)  # seconds between discovery announcements
    metrics_interval: float = Field(5.0, gt=0)  # seconds between metrics feed messages
    idle_spin_us: int = IDLE_SPIN  # busy-poll after I/O before sleeping (atoll/eventloop.py)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_name(v, "agent name")
        except ProtocolError as exc:
            raise ValueError(exc.reason) from None

    @model_validator(mode="before")
    @classmethod
    def _no_labels(cls, v: Any) -> Any:
        if isinstance(v, dict) and "labels" in v:
            raise ValueError(
                "labels are signed into the agent's credential, not set in its config: "
                "`atoll token create --label phi=true ...` (then join with that token)"
            )
        return v

    @field_validator("brokers")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"broker URL {url!r} must start with ws:// or wss://")
        return v


class BrokerSection(BaseModel):
    """``[broker]``: of an agent that also runs its island's broker, or of a standalone broker
    (``atoll broker --config FILE``, a file with only this section)."""

    model_config = ConfigDict(extra="forbid")

    data_dir: ConfigPath | None = None  # the broker's identity (default: the agent's or -d)
    listen: str = "127.0.0.1:7400"
    peers: list[str] = []  # other brokers to link with into the mesh
    advertise: bool = True  # announce _atoll._tcp.local. on the LAN (mDNS)
    tls_cert: ConfigPath | None = None  # both set: the broker listens on wss://
    tls_key: ConfigPath | None = None
    ca_file: ConfigPath | None = None  # CA bundle for wss:// peers (default: the agent's)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return check_listen(v)

    @model_validator(mode="after")
    def _tls_pair(self) -> BrokerSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("broker tls_cert and tls_key go together")
        return self

    max_message: int = Field(8 * 1024 * 1024, ge=64 * 1024)
    queue_limit: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    # How long an agent's kept publications (announcement, metrics) outlive its last link.
    kept_ttl_s: float = Field(600.0, ge=1.0)
    idle_spin_us: int = IDLE_SPIN  # a standalone broker's; beside an agent, [agent]'s applies


class BrokerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    broker: BrokerSection


class AtollConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: AgentSection
    broker: BrokerSection | None = None
    plugins: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _one_loop(self) -> AtollConfig:
        if self.broker is not None and "idle_spin_us" in self.broker.model_fields_set:
            raise ValueError(
                "broker.idle_spin_us: the agent and its broker share one event loop; "
                "set idle_spin_us in [agent]"
            )
        return self


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(raw: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key} overrides a value that is not a table")
        node[path[-1]] = _parse_env_value(value)
    return raw


M = TypeVar("M", bound=BaseModel)


def _load(model: type[M], path: Path, env: dict[str, str] | None) -> M:
    """The file with the environment's overrides, validated; relative paths are relative to it."""
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    raw = apply_env(raw, dict(os.environ) if env is None else env)
    return model.model_validate(raw, context={"config_dir": path.resolve().parent})


def load_config(path: Path, env: dict[str, str] | None = None) -> AtollConfig:
    return _load(AtollConfig, Path(path), env)


def load_broker_config(path: Path, env: dict[str, str] | None = None) -> BrokerSection:
    """A standalone broker's file: a ``[broker]`` section and nothing else."""
    return _load(BrokerFile, Path(path), env).broker
