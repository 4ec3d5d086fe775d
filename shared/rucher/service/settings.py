"""Service settings, read once from the environment and passed in explicitly."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class LogFormat(StrEnum):
    """How logs are rendered: JSON lines in production, aligned key=value on a terminal."""

    JSON = "json"
    CONSOLE = "console"


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def env_number(
    environ: Mapping[str, str], name: str, default: float, minimum: float | None = None
) -> float:
    """The number in ``environ[name]`` (``default`` if unset or empty); errors name the variable.

    Without ``minimum`` the value must be positive; with one, at least ``minimum``.
    """
    raw = environ.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise SettingsError(f"{name}={raw!r} is not a number") from err
    if minimum is None and value <= 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """What every Rucher service reads from ``RUCHER_*`` variables."""

    service: str
    nats_urls: tuple[str, ...]
    node: str
    state_dir: Path
    log_format: LogFormat
    log_level: str
    registry_ttl: float
    js_replicas: int | None
    shutdown_grace: float

    @classmethod
    def from_env(cls, service: str, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read the settings, naming the variable at fault when one is wrong."""
        number = functools.partial(env_number, environ)
        try:
            log_format = LogFormat(environ.get("RUCHER_LOG_FORMAT", "json"))
        except ValueError as err:
            raise SettingsError(
                f"RUCHER_LOG_FORMAT={environ['RUCHER_LOG_FORMAT']!r}: use json or console"
            ) from err
        urls = tuple(
            url.strip()
            for url in environ.get("RUCHER_NATS_URL", "nats://127.0.0.1:4222").split(",")
            if url.strip()
        )
        if not urls:
            raise SettingsError("RUCHER_NATS_URL is empty")
        replicas = environ.get("RUCHER_JS_REPLICAS")
        return cls(
            service=service,
            nats_urls=urls,
            node=environ.get("RUCHER_NODE") or socket.gethostname().split(".")[0],
            state_dir=Path(environ.get("RUCHER_STATE_DIR", ".state")),
            log_format=log_format,
            log_level=environ.get("RUCHER_LOG_LEVEL", "info").lower(),
            registry_ttl=number("RUCHER_REGISTRY_TTL", 15.0),
            js_replicas=int(number("RUCHER_JS_REPLICAS", 1)) if replicas else None,
            shutdown_grace=number("RUCHER_SHUTDOWN_GRACE", 10.0),
        )
