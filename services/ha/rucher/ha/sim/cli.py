"""``rucher-ha-sim DIR``: run one Proxmox HA scenario folder and print its log."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rucher.ha.sim.hardware import Hardware
from rucher.ha.sim.run import run
from rucher.ha.sim.scenario import ScenarioError, load


def simulate(folder: Path, emit: Callable[[str], None] = print) -> list[str]:
    """Run the scenario in ``folder``; the log lines."""
    return run(Hardware(load(folder), emit))


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the log of one scenario; exit 2 with a message on bad input."""
    parser = argparse.ArgumentParser(prog="rucher-ha-sim", description=__doc__)
    parser.add_argument("folder", type=Path, help="scenario folder (cmdlist, hardware_status, ...)")
    args = parser.parse_args(argv)
    try:
        simulate(args.folder)
    except ScenarioError as error:
        print(f"rucher-ha-sim: {error}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
