"""The HA service on one node: ``python -m rucher.ha``.

Composition root of the live node part: read the settings, follow the HA guest set, hold the
node's lease under the watchdog (with its guard process) until the service stops. The elected
manager's live environment is not wired here yet; the decision core runs in the simulator.
"""

from __future__ import annotations

from importlib import metadata

from rucher.ha.config import HaNodeSettings
from rucher.ha.lease import start_node_watchdog
from rucher.service import ServiceContext, main

VERSION = metadata.version("rucher-ha")


async def setup(context: ServiceContext) -> None:
    """Start the node lease and its watchdog; stop them with the service."""
    settings = HaNodeSettings.from_env(context.settings)
    watchdog, guests = await start_node_watchdog(
        context.bus,
        settings.watchdog,
        holder=f"{context.settings.node}:{context.instance.instance}",
        state_dir=context.settings.state_dir,
    )

    async def stop() -> None:
        await watchdog.stop()
        await guests.stop()

    context.on_stop(stop)


if __name__ == "__main__":
    main("ha", setup, version=VERSION)
