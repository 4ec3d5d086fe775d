"""The gateway's self-signed TLS certificate, made on first start when none is supplied.

Clients of the Proxmox API hard-code ``https``; like Proxmox's ``pve-ssl.pem`` the certificate
names the host, ``localhost`` and the loopback addresses, and lives ten years. The key is
written readable by its owner only, and both files appear atomically (a crash never leaves a
certificate without its key). A certificate about to expire is replaced. The gateway makes it in
a short-lived child process (``python -m rucher.gateway.certs CERT KEY NODE``), so the crypto
library never occupies the long-running gateway's memory.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import sys
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = structlog.get_logger("rucher.gateway.certs")

VALIDITY = datetime.timedelta(days=3650)
RENEW_BEFORE = datetime.timedelta(days=30)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _still_valid(cert_file: Path, key_file: Path) -> bool:
    if not (cert_file.is_file() and key_file.is_file()):
        return False
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return remaining > RENEW_BEFORE


def ensure_self_signed(cert_file: Path, key_file: Path, *, node: str) -> bool:
    """Create a self-signed certificate and key unless valid ones exist; True when created."""
    if _still_valid(cert_file, key_file):
        return False
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    hostname = socket.gethostname()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Rucher"),
            x509.NameAttribute(NameOID.COMMON_NAME, hostname),
        ]
    )
    names: list[x509.GeneralName] = [
        x509.DNSName(dns) for dns in dict.fromkeys((hostname, node, "localhost"))
    ]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(key_file, key_pem, 0o600)
    _write(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    log.info("tls_certificate_created", cert=str(cert_file), hostname=hostname)
    return True


async def ensure_in_child(cert_file: Path, key_file: Path, *, node: str) -> None:
    """Run :func:`ensure_self_signed` in a child process; raise if it fails."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rucher.gateway.certs",
        str(cert_file),
        str(key_file),
        node,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"cannot create the TLS certificate: {output.decode(errors='replace')}")


if __name__ == "__main__":
    cert_path, key_path, node_name = sys.argv[1:4]
    ensure_self_signed(Path(cert_path), Path(key_path), node=node_name)
