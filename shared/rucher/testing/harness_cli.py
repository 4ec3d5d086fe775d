"""``ops/harness``: the multi-node harness from a shell (``python -m rucher.testing.harness_cli``).

``up N`` leaves a detached run behind; the other commands find it again through its registry file
(``--run ID`` picks one when several exist).
"""

# ruff: noqa: T201 - a command-line tool: printing is how it answers.

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rucher.testing.harness import Harness, prune, registered_runs
from rucher.testing.harness_node import NATS_MONITOR_PORT, Node

CHECKOUT = Path(__file__).resolve().parents[3]


def _state(node: Node) -> str:
    if not node.alive:
        return "down"
    return "cut" if node.cut_off else "up"


def _print(harness: Harness) -> None:
    print(
        f"harness {harness.run_id}: {harness.size} nodes, subnet {harness.subnet}, "
        f"bridge {harness.bridge} ({harness.bridge_address}), state {harness.root}"
    )
    for node in harness.nodes:
        running = ", ".join(name for name, p in node.processes.items() if p.alive) or "nothing"
        print(
            f"  {node.name:<4} {_state(node):<5} netns {node.namespace:<13} {node.url}  "
            f"monitor http://{node.address}:{NATS_MONITOR_PORT}  runs: {running}"
        )
    print(f"  NATS servers: {','.join(harness.urls)}")
    for node in (node for node in harness.nodes if node.libvirt):
        print(f"  {node.name} libvirt: {node.libvirtd.uri} (peers: {node.libvirtd.peer_uri})")
    if harness.ceph is not None:
        state = "up" if harness.ceph.running else "down"
        print(f"  ceph {state}: mon {harness.ceph.monhost}, conf {harness.ceph.conf}")
    if harness.nodes:
        print(f"  a shell on a node: ip netns exec {harness.nodes[0].namespace} bash")


def _pick_run(run_id: str | None) -> Harness:
    if run_id:
        return Harness.load(run_id)
    detached = [r for r in registered_runs() if not Harness.load(r).owner_pid]
    if len(detached) == 1:
        return Harness.load(detached[0])
    if not detached:
        raise SystemExit("no harness run started by ops/harness up (see ops/harness status)")
    raise SystemExit(f"several runs exist ({', '.join(detached)}): pick one with --run ID")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and act on a run."""
    parser = argparse.ArgumentParser(prog="ops/harness", description=__doc__)
    parser.add_argument("--run", help="the run to act on (default: the only detached one)")
    parser.add_argument("--root", type=Path, default=CHECKOUT, help="the checkout")
    parser.add_argument("--force", action="store_true", help="act on a run a live process owns")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start N nodes and leave them running")
    start.add_argument("size", type=int)
    start.add_argument(
        "--libvirt", action="store_true", help="give every node a libvirtd of its own"
    )
    start.add_argument(
        "--ceph", action="store_true", help="one Ceph on the bridge, shared by every node"
    )
    commands.add_parser("status", help="describe the runs (or --run ID)")
    for name, text in [
        ("kill", "SIGKILL every process of NODE (a crash)"),
        ("restart", "crash NODE if it runs, then start its processes again"),
        ("cut", "isolate NODE's network"),
        ("heal", "reconnect a cut NODE"),
    ]:
        commands.add_parser(name, help=text).add_argument("node", help="n1, n2, ...")
    commands.add_parser("down", help="tear the run down")
    cleanup = commands.add_parser("prune", help="tear down runs whose owner died")
    cleanup.add_argument("--all", action="store_true", help="ops/harness runs too")
    args = parser.parse_args(argv)

    if args.command == "up":
        run_id = Harness.new_run_id()
        root = args.root / ".test-state" / "harness" / run_id
        harness = Harness(
            args.size, root, run_id=run_id, detached=True, libvirt=args.libvirt, ceph=args.ceph
        ).start()
        _print(harness)
        print(f"  stop it with: ops/harness --run {run_id} down")
        return 0
    if args.command == "status":
        runs = [args.run] if args.run else registered_runs()
        if not runs:
            print("no harness runs")
        for run_id in runs:
            _print(Harness.load(run_id))
        return 0
    if args.command == "prune":
        removed = prune(include_detached=args.all)
        print(f"removed: {', '.join(removed)}" if removed else "nothing to remove")
        return 0

    harness = _pick_run(args.run)
    if harness.owner_alive and not args.force:
        raise SystemExit(
            f"run {harness.run_id} belongs to process {harness.owner_pid} (a test session, most "
            "likely): it tears the run down itself; --force to act on it anyway"
        )
    if args.command == "down":
        harness.stop()
        print(f"harness {harness.run_id} removed (its state stays in {harness.root})")
        return 0
    action = {
        "kill": harness.kill,
        "restart": harness.restart,
        "cut": harness.cut,
        "heal": harness.heal,
    }[args.command]
    action(args.node)
    _print(harness)
    return 0


if __name__ == "__main__":
    sys.exit(main())
