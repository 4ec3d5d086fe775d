"""The node part alone: ``python -m rucher.ha.nodewatch`` holds the node lease under the watchdog.

The full service (``python -m rucher.ha``) runs this and the manager; this entry point runs only
the lease, the watchdog and its guard, for tests of the fencing path and for nodes that must be
fenced but never manage (their HA guests still die when they lose the lease).
"""

from __future__ import annotations

from importlib import metadata

from rucher.ha.config import HaNodeSettings
from rucher.ha.lease import start_node_watchdog
from rucher.service import ServiceContext, main

VERSION = metadata.version("rucher-ha")


async def setup(context: ServiceContext) -> None:
    """Start the node lease and its watchdog; stop them with the process."""
    settings = HaNodeSettings.from_env(context.settings)
    watchdog, guests, leader = await start_node_watchdog(
        context.bus,
        settings.watchdog,
        holder=f"{context.settings.node}:{context.instance.instance}",
        state_dir=context.settings.state_dir,
    )
    context.on_stop(watchdog.stop)
    context.on_stop(guests.stop)
    context.on_stop(leader.stop)


if __name__ == "__main__":
    main("ha", setup, version=VERSION)
