"""Memory benchmark: start the one-node stack, let it idle, report each process's RSS.

Run: .venv/bin/python ops/bench/memory.py [--idle SECONDS] [--settle SECONDS]

Starts its own stack (a temporary state folder and free ports, so a stack from ops/up is left
alone) through the same code as ops/up, with libvirtd as ops/up starts it (stopped again after if
this run started it), lets it settle and idle, samples every process's
resident memory (VmRSS) once a second and reports the peak. Rucher's processes (every service
and the supervisor) make the control plane; NATS and other daemons are listed apart and not counted.
Targets (DEVELOPERS.md): each service under 80 MiB, the whole control plane under 1 GiB. A
process that is not running when sampled fails the run (exit 1): its memory would read as zero.

Last line: RESULT max_service_mib=<largest Rucher process> total_mib=<control plane sum>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rucher.testing import libvirt
from rucher.testing.nats import free_port

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = {"nats"}
SERVICE_TARGET_MIB = 80.0
TOTAL_TARGET_MIB = 1024.0


def rss_mib(pid: int) -> float:
    """Resident memory of one process in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return 0.0
    return 0.0


def stack(command: str, env: dict[str, str]) -> None:
    """Run ``rucher.testing.stack <command>`` as ops/up and ops/down do."""
    subprocess.run(
        [sys.executable, "-m", "rucher.testing.stack", *command.split(), "--root", str(ROOT)],
        env=env,
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=20.0, help="seconds to idle (default 20)")
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds after the stack reports ready before sampling (default 5): first-start work "
        "such as hashing the bootstrap password is start-up, not idle",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rucher-memory-") as tmp:
        env = {
            **os.environ,
            "RUCHER_STATE_DIR": str(Path(tmp) / "state"),
            "RUCHER_NATS_PORT": str(free_port()),
            "RUCHER_NATS_MONITOR_PORT": str(free_port()),
            "RUCHER_GATEWAY_PORT": str(free_port()),
        }
        daemon = libvirt.Daemon()
        started_libvirt = not libvirt.answers(daemon)
        libvirt.up(daemon)  # the compute agent needs it, as under ops/up
        stack("up", env)
        missing: set[str] = set()
        try:
            status = json.loads((Path(tmp) / "state" / "run" / "status.json").read_text())
            pids = {name: child["pid"] for name, child in status["children"].items()}
            pids["supervisor"] = status["supervisor_pid"]
            peaks = dict.fromkeys(pids, 0.0)
            time.sleep(args.settle)
            deadline = time.monotonic() + args.idle
            while time.monotonic() < deadline:
                for name, pid in pids.items():
                    rss = rss_mib(pid)
                    if rss == 0.0:
                        missing.add(name)
                    peaks[name] = max(peaks[name], rss)
                time.sleep(1.0)
        finally:
            stack("down --purge", env)
            if started_libvirt:
                libvirt.down(daemon)
    ours = {name: mib for name, mib in peaks.items() if name not in DAEMONS}
    print(f"idle {args.idle:.0f} s, peak RSS per process:")
    for name, mib in sorted(ours.items()):
        verdict = "ok" if mib < SERVICE_TARGET_MIB else f"OVER {SERVICE_TARGET_MIB:.0f} MiB"
        if name in missing:
            verdict = "NOT RUNNING at some sample (restarted or dead)"
        print(f"  {name:<12} {mib:7.1f} MiB  {verdict}")
    for name in sorted(set(peaks) & DAEMONS):
        print(f"  {name:<12} {peaks[name]:7.1f} MiB  (daemon, not counted)")
    total = sum(ours.values())
    largest = max(ours.values(), default=0.0)
    print(f"control plane total {total:.1f} MiB (target < {TOTAL_TARGET_MIB:.0f} MiB)")
    print(f"RESULT max_service_mib={largest:.1f} total_mib={total:.1f}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
