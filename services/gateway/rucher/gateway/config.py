"""The gateway's settings, read once from the environment beside the common service settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rucher.service import Settings, SettingsError

DEFAULT_PORT = 8006
# Proxmox's HTTP server refuses larger request bodies; nothing the API takes needs more.
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens, its TLS certificate, and the cluster name it reports.

    ``generated_cert`` is true when no certificate was supplied: a self-signed one is then
    kept under the state folder and created on first start.
    """

    host: str
    port: int
    cert_file: Path
    key_file: Path
    generated_cert: bool
    cluster_name: str
    login_timeout: float = 30.0
    request_timeout: float = 10.0

    @classmethod
    def from_env(
        cls, settings: Settings, environ: Mapping[str, str] = os.environ
    ) -> GatewaySettings:
        """Read ``RUCHER_GATEWAY_LISTEN`` (``host:port``), ``RUCHER_GATEWAY_CERT``/``_KEY``.

        Without ``RUCHER_GATEWAY_LISTEN`` the dev stack's ``RUCHER_GATEWAY_HOST`` and
        ``RUCHER_GATEWAY_PORT`` apply; the default is every IPv4 address, port 8006.
        """
        listen = environ.get("RUCHER_GATEWAY_LISTEN", "").strip()
        if listen:
            host, port = _split_listen(listen)
        else:
            host = environ.get("RUCHER_GATEWAY_HOST") or "0.0.0.0"
            port = _port("RUCHER_GATEWAY_PORT", environ.get("RUCHER_GATEWAY_PORT") or "8006")
        cert = environ.get("RUCHER_GATEWAY_CERT", "").strip()
        key = environ.get("RUCHER_GATEWAY_KEY", "").strip()
        if bool(cert) != bool(key):
            raise SettingsError("set both RUCHER_GATEWAY_CERT and RUCHER_GATEWAY_KEY, or neither")
        if cert:
            for name, path in (("RUCHER_GATEWAY_CERT", cert), ("RUCHER_GATEWAY_KEY", key)):
                if not Path(path).is_file():
                    raise SettingsError(f"{name}={path!r} is not a readable file")
            cert_file, key_file = Path(cert), Path(key)
        else:
            cert_file = settings.state_dir / "gateway" / "pve-ssl.pem"
            key_file = settings.state_dir / "gateway" / "pve-ssl.key"
        return cls(
            host=host,
            port=port,
            cert_file=cert_file,
            key_file=key_file,
            generated_cert=not cert,
            cluster_name=environ.get("RUCHER_CLUSTER_NAME") or "rucher",
        )


def _port(name: str, raw: str) -> int:
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise SettingsError(f"{name}: {raw!r} is not a TCP port")
    return int(raw)


def _split_listen(listen: str) -> tuple[str, int]:
    """``0.0.0.0:8006``, ``[::]:8006``, ``:8006`` (every address) or ``host`` (port 8006)."""
    if listen.startswith("["):
        host, _, rest = listen[1:].partition("]")
        port = rest.removeprefix(":") or str(DEFAULT_PORT)
    elif listen.count(":") == 1:
        host, _, port = listen.partition(":")
    else:
        host, port = listen, str(DEFAULT_PORT)
    return host or "0.0.0.0", _port("RUCHER_GATEWAY_LISTEN", port)
