"""Typed configuration: `config.toml` decoded by msgspec, then `BROKER_<SECTION>__<KEY>` overrides.

Unknown keys are an error, so a typo fails at start instead of being ignored.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from eventstore.base import StoreConfig

DEFAULT_PATH = "config.toml"


class ConfigError(Exception):
    """The configuration is unreadable or invalid; the message says where and why."""


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = msgspec.field(default=8000)
    data_dir: str = "./data"  # keys and other files beside the log
    max_body_bytes: int = 1024 * 1024  # request bodies larger than this get 413
    shutdown_timeout: float = 10.0


class LogConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    level: str = "info"
    format: str = "json"  # json | console


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)


def load_config(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Config:
    """Read `path` (or ./config.toml when it exists), apply env overrides, validate."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source = Path(path) if path is not None else Path(DEFAULT_PATH)
    if path is not None and not source.exists():
        raise ConfigError(f"config file {source} does not exist")
    if source.exists():
        try:
            data = tomllib.loads(source.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {source}: {exc}") from None
    for key, value in env.items():
        if not key.startswith("BROKER_") or "__" not in key:
            continue
        section, _, name = key[len("BROKER_") :].lower().partition("__")
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{key}: [{section}] is not a section")
        target[name] = value
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        where = f"{source}" if source.exists() else "the configuration"
        raise ConfigError(f"invalid {where} (or BROKER_* environment): {exc}") from None
    _check(config)
    return config


def _check(config: Config) -> None:
    if not 0 <= config.server.port <= 65535:
        raise ConfigError(f"[server] port must be 0..65535, not {config.server.port}")
    if config.store.backend not in ("sqlite", "memory", "nats"):
        raise ConfigError(
            f"[store] backend must be sqlite, memory or nats, not {config.store.backend!r}"
        )
    if config.store.synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(
            f"[store] synchronous must be OFF, NORMAL, FULL or EXTRA, not "
            f"{config.store.synchronous!r}"
        )
    if config.log.format not in ("json", "console"):
        raise ConfigError(f"[log] format must be json or console, not {config.log.format!r}")
