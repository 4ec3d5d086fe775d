"""A libvirtd for development and tests, started by hand (no systemd), and a pytest fixture.

``python -m rucher.testing.libvirt up|down|status`` (run by ``ops/libvirt``) configures QEMU to
run as root (disk images live in Rucher's own folders), makes ``/dev/kvm`` usable by the
``kvm`` group (libvirt otherwise re-probes QEMU on every define, about 44 s), starts virtlogd
then libvirtd, and creates the isolated bridge ``vmbr0`` when it is absent. ``NodeDaemon`` is
the private libvirtd each node of the multi-node harness may run (its own state, sockets and
host UUID in a private mount namespace; peers reach it on ``qemu+tcp`` over the harness bridge).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SYSTEM_URI = "qemu:///system"
DEFAULT_BRIDGE = "vmbr0"
START_PATIENCE = 30.0
STOP_PATIENCE = 15.0
MARK = "# managed by rucher ops/libvirt"
# What a node's private libvirtd gets its own copy of (PLATFORM-NOTES.md: live migration).
PRIVATE_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt",
                "/var/log/libvirt")  # fmt: skip
TCP_PORT = 16509


@dataclass(frozen=True)
class Daemon:
    """Where one libvirtd keeps its configuration, sockets and pid files."""

    etc: Path = Path("/etc/libvirt")
    run: Path = Path("/run")
    bridge: str = DEFAULT_BRIDGE
    settings: dict[str, dict[str, str]] = field(
        default_factory=lambda: {
            "qemu.conf": {"user": '"+0"', "group": '"+0"', "security_driver": '"none"'},
        }
    )

    @property
    def socket(self) -> Path:
        """The read-write UNIX socket of libvirtd."""
        return self.run / "libvirt" / "libvirt-sock"

    def pidfile(self, program: str) -> Path:
        """The pid file ``program`` (virtlogd, libvirtd) writes when run with ``-d``."""
        return self.run / f"{program}.pid"


def _set_options(path: Path, options: dict[str, str]) -> bool:
    """Set ``key = value`` lines in a libvirt config file; True when the file changed."""
    text = path.read_text() if path.exists() else ""
    lines = [
        line
        for line in text.splitlines()
        if not any(re.match(rf"^\s*{re.escape(key)}\s*=", line) for key in options)
    ]
    lines = [line for line in lines if line != MARK]
    lines.append(MARK)
    lines.extend(f"{key} = {value}" for key, value in options.items())
    new = "\n".join(lines) + "\n"
    if new == text:
        return False
    path.write_text(new)
    return True


def _host_uuid(daemon: Daemon) -> str:
    """The host UUID libvirtd needs here: these machines have no SMBIOS UUID to read."""
    current = daemon.etc / "libvirtd.conf"
    if current.exists():
        found = re.search(r'^host_uuid\s*=\s*"([0-9a-f-]{36})"', current.read_text(), re.M)
        if found:
            return found.group(1)
    return str(uuid.uuid4())


def configure(daemon: Daemon) -> None:
    """Write Rucher's settings into the daemon's qemu.conf and libvirtd.conf."""
    for name, options in daemon.settings.items():
        _set_options(daemon.etc / name, options)
    _set_options(daemon.etc / "libvirtd.conf", {"host_uuid": f'"{_host_uuid(daemon)}"'})


def fix_kvm_permissions(device: Path = Path("/dev/kvm")) -> None:
    """Let the ``kvm`` group open /dev/kvm, as Debian's udev rule would (there is no udev)."""
    if not device.exists():
        return
    with contextlib.suppress(KeyError, PermissionError):
        os.chown(device, -1, grp.getgrnam("kvm").gr_gid)
        os.chmod(device, 0o660)


def ensure_bridge(name: str) -> None:
    """Create the isolated Linux bridge ``name`` (no uplink) and bring it up, unless it exists."""
    if not Path(f"/sys/class/net/{name}").exists():
        subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


def answers(daemon: Daemon) -> bool:
    """Whether libvirtd accepts connections on its socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(daemon.socket))
        except OSError:
            return False
    return True


def _running(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def up(daemon: Daemon) -> None:
    """Start virtlogd and libvirtd unless libvirtd answers; create the bridge."""
    fix_kvm_permissions()
    ensure_bridge(daemon.bridge)
    if answers(daemon):
        return
    configure(daemon)
    if _running(daemon.pidfile("virtlogd")) is None:
        subprocess.run(["virtlogd", "-d"], check=True)
    if _running(daemon.pidfile("libvirtd")) is None:
        subprocess.run(["libvirtd", "-d"], check=True)
    deadline = time.monotonic() + START_PATIENCE
    while not answers(daemon):
        if time.monotonic() > deadline:
            message = f"libvirtd did not answer on {daemon.socket} within {START_PATIENCE} s"
            raise RuntimeError(message)
        time.sleep(0.1)


def down(daemon: Daemon) -> None:
    """Stop libvirtd then virtlogd (SIGTERM, then SIGKILL after a while)."""
    for program in ("libvirtd", "virtlogd"):
        pid = _running(daemon.pidfile(program))
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_PATIENCE
        while _running(daemon.pidfile(program)) == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            if _running(daemon.pidfile(program)) == pid:
                os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class NodeDaemon:
    """A libvirtd (with its virtlogd) private to one harness node, listening on its address.

    It runs in a private mount namespace where the node's own folders are bound over
    ``PRIVATE_DIRS`` (so QEMU state, secrets, logs and the host UUID are the node's), inside the
    node's network namespace, and accepts peers on ``qemu+tcp://ADDRESS/system`` without
    authentication: only the harness bridge reaches that address. Its ``/run`` is emptied at
    every start, as a reboot would.
    """

    root: Path
    address: str
    host_uuid: str
    link: Path | None = None

    def folder(self, system: str) -> Path:
        """The node's folder bound over the system folder ``system``."""
        return self.root / system.strip("/").replace("/", "-")

    @property
    def socket(self) -> Path:
        """The read-write UNIX socket, reachable from outside the mount namespace.

        A UNIX socket's path has at most 107 bytes: through ``link`` (a short symlink to
        ``root``) a daemon deep in a test's temporary folder can still be reached.
        """
        return (self.link or self.root) / self.folder("/run/libvirt").name / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The URI the node's compute agent opens."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def peer_uri(self) -> str:
        """The URI other nodes' libvirtds reach this one by (peer-to-peer migration)."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def qemu_pid_dir(self) -> Path:
        """Where libvirtd writes each running domain's QEMU pid file."""
        return self.folder("/run/libvirt") / "qemu"

    def prepare(self) -> None:
        """Create the node's folders from this machine's configuration, with its own settings.

        Only the daemons' ``*.conf`` files are copied from ``/etc/libvirt`` (no domains, no
        ``default`` NAT network, which would start dnsmasq); QEMU's capability cache is copied
        so the first define does not probe QEMU again.
        """
        fix_kvm_permissions()
        for system in PRIVATE_DIRS:
            self.folder(system).mkdir(parents=True, exist_ok=True)
        if self.link is not None:
            self.link.parent.mkdir(parents=True, exist_ok=True)
            self.link.unlink(missing_ok=True)
            self.link.symlink_to(self.root, target_is_directory=True)
        etc = self.folder("/etc/libvirt")
        if not (etc / "libvirtd.conf").exists():
            # The daemons' settings only: this machine's domains, networks, pools and secrets
            # (its own libvirtd's, other tests') are no node's.
            for conf in Path("/etc/libvirt").glob("*.conf"):
                shutil.copy2(conf, etc / conf.name)
        cache = Path("/var/cache/libvirt/qemu/capabilities")
        mine = self.folder("/var/cache/libvirt") / "qemu" / "capabilities"
        if cache.is_dir() and not mine.exists():
            shutil.copytree(cache, mine)
        _set_options(etc / "qemu.conf", Daemon().settings["qemu.conf"])
        _set_options(
            etc / "libvirtd.conf",
            {
                "host_uuid": f'"{self.host_uuid}"',
                "listen_tls": "0",
                "listen_tcp": "1",
                "listen_addr": f'"{self.address}"',
                "tcp_port": f'"{TCP_PORT}"',
                "auth_tcp": '"none"',
            },
        )

    def argv(self) -> list[str]:
        """The command that starts virtlogd and libvirtd in their private mount namespace.

        Both stay in the command's process group (virtlogd as a background job, libvirtd by
        ``exec``); QEMU processes leave it, so a node is killed through its network namespace.
        """
        run = self.folder("/run/libvirt")
        steps = [
            "set -e",
            f"find {shlex.quote(str(run))} -mindepth 1 -delete",
            *(
                f"mount --bind {shlex.quote(str(self.folder(system)))} {system}"
                for system in PRIVATE_DIRS
            ),
            f"virtlogd --pid-file {shlex.quote(str(self.root / 'virtlogd.pid'))} &",
            f"exec libvirtd --listen --pid-file {shlex.quote(str(self.root / 'libvirtd.pid'))}",
        ]
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(steps)]

    def answers(self) -> bool:
        """Whether libvirtd accepts connections on its socket."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True


def libvirt_unavailable() -> str | None:
    """Why libvirtd cannot run here (not root, not installed), or None when it can."""
    if os.geteuid() != 0:
        return "libvirtd needs root"
    for program in ("libvirtd", "virtlogd", "qemu-system-x86_64"):
        if not any(Path(folder, program).exists() for folder in ("/usr/sbin", "/usr/bin")):
            return f"{program} is not installed (run ops/libvirt install)"
    return None


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """A running system libvirtd (started if needed, left running); yields its URI."""
    reason = libvirt_unavailable()
    if reason is not None:
        pytest.skip(reason)
    up(Daemon())
    return SYSTEM_URI


@dataclass(frozen=True)
class GuestImage:
    """The test guest built by ``ops/build-guest``: a kernel and a busybox initramfs."""

    kernel: Path
    initrd: Path
    cmdline: str = "console=ttyS0 quiet panic=-1"
    banner: str = "rucher-guest: up"


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Build the test guest once (cached in build/guest) and return its files."""
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run(
        [str(root / "ops" / "build-guest"), "--print-dir"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"ops/build-guest failed: {result.stderr.strip()}")
    folder = Path(result.stdout.strip().splitlines()[-1])
    return GuestImage(kernel=folder / "vmlinux", initrd=folder / "initramfs.cpio")


def main(argv: list[str] | None = None) -> int:
    """``up``, ``down`` or ``status`` of this machine's libvirtd."""
    parser = argparse.ArgumentParser(prog="rucher.testing.libvirt")
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE)
    args = parser.parse_args(argv)
    daemon = Daemon(bridge=args.bridge)
    if args.command == "up":
        up(daemon)
        sys.stdout.write(f"libvirtd answers on {daemon.socket}; bridge {daemon.bridge} is up\n")
    elif args.command == "down":
        down(daemon)
    else:
        running = answers(daemon)
        sys.stdout.write(
            f"libvirtd {'answers' if running else 'is not running'} on {daemon.socket}\n"
        )
        return 0 if running else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
