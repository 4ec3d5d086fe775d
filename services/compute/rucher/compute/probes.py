"""The other nodes' hypervisors as reconciliation asks them: which one has a guest's domain."""

from __future__ import annotations

from rucher.bus import Bus, RucherError
from rucher.compute.domain_xml import domain_name
from rucher.compute.service import ComputeService
from rucher.proto import compute
from rucher.proto.common import PowerState
from rucher.registry import ServiceRegistry

PROBE_TIMEOUT = 10.0


class BusProbes:
    """Peers over the bus (``rpc.compute.guest_domain_probe.{node}``); the registry names them."""

    def __init__(self, bus: Bus, timeout: float = PROBE_TIMEOUT) -> None:
        self.bus = bus
        self.registry = ServiceRegistry(bus)
        self.timeout = timeout

    async def nodes(self) -> set[str]:
        """Nodes whose compute agent is registered now."""
        return {instance.node for instance in await self.registry.instances("compute")}

    async def probe(self, node: str, vmid: int) -> PowerState | None:
        """``node``'s domain of ``vmid``: its state, None when it has none or does not answer."""
        try:
            reply = await self.bus.request(
                compute.GUEST_DOMAIN_PROBE.to(node=node),
                compute.VmDomainProbe(vmid=vmid),
                timeout=self.timeout,
            )
        except RucherError:
            return None
        return reply.state


async def answer_probe(
    service: ComputeService, query: compute.VmDomainProbe
) -> compute.VmDomainPresence:
    """This node's domain of the VM, whoever owns it."""
    info = await service.hypervisor.info(domain_name(query.vmid))
    return compute.VmDomainPresence(vmid=query.vmid, state=None if info is None else info.state)
