"""Proxmox cluster resource scheduling (CRS) scores: ``basic``, ``static`` and ``dynamic``.

- ``basic``: fewest guests on the node (Proxmox counts HA services).
- ``static``: TOPSIS over the cluster's root-mean-square and highest CPU and memory load as if
  the guest already ran on the node, from configured vCPUs and memory (Proxmox VE 9's
  resource scheduling: weights 1, 2, 5 and 10, all minimised).
- ``dynamic``: the same criteria from the nodes' measured CPU and memory use.

The averages and maxima are taken over the candidates scored: every online node when the
cluster is small enough to be scanned whole (the HA manager's case), a sample otherwise.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from rucher.placement.demand import Demand
from rucher.placement.topsis import topsis
from rucher.placement.view import ClusterView
from rucher.placement.weighers.base import Rows, Scores, Weigher
from rucher.proto.scheduler import CrsMode, PlacementPolicy

CRITERIA = np.array([-1.0, -2.0, -5.0, -10.0])  # mean CPU, highest CPU, mean/highest memory


def _with_guest(
    used: NDArray[np.float64], added: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Root mean square and highest of ``used`` over all rows, when row t also takes ``added[t]``.

    Both are offset by 1, as Proxmox does, so tiny loads do not look hugely different.
    """
    count = len(used)
    after = used + added
    squares = float((used * used).sum())
    rms = np.sqrt((squares - used * used + after * after) / count)
    if count == 1:
        return 1.0 + rms, 1.0 + after
    order = np.argsort(used)
    top, second = used[order[-1]], used[order[-2]]
    others = np.full(count, top)
    others[order[-1]] = second  # the highest of the *other* rows, for the top row itself
    return 1.0 + rms, 1.0 + np.maximum(others, after)


def static_scores(
    cpu: NDArray[np.float64],
    maxcpu: NDArray[np.float64],
    *,
    mem: NDArray[np.float64],
    maxmem: NDArray[np.float64],
    guest_cpu: float,
    guest_mem: float,
) -> Scores:
    """Proxmox's static-usage score of each node for starting a guest there (higher is better).

    ``cpu`` is the vCPUs configured on each node, ``mem`` the memory; a guest CPU of 0 means
    unlimited and counts as the node's every CPU, as in Proxmox.
    """
    maxcpu = np.maximum(maxcpu, 1.0)
    maxmem = np.maximum(maxmem, 1.0)
    cpu_added = maxcpu if guest_cpu == 0 else np.full(len(cpu), guest_cpu)
    mean_cpu, highest_cpu = _with_guest(cpu / maxcpu, cpu_added / maxcpu)
    mean_mem, highest_mem = _with_guest(mem / maxmem, guest_mem / maxmem)
    matrix = np.stack([mean_cpu, highest_cpu, mean_mem, highest_mem], axis=1)
    return topsis(matrix, CRITERIA)


def basic_scores(guests: NDArray[np.float64]) -> Scores:
    """Proxmox's basic score: fewer guests is better, mapped onto [0, 1]."""
    return 1.0 / (1.0 + guests)


def score(view: ClusterView, demand: Demand, rows: Rows, policy: PlacementPolicy) -> Scores | None:
    """The score of the policy's CRS mode, or None when the policy sets none."""
    if policy.crs is None:
        return None
    if policy.crs is CrsMode.BASIC:
        return basic_scores(view.guests[rows].astype(np.float64))
    if policy.crs is CrsMode.STATIC:
        cpu = view.vcpu_used[rows]
        mem = view.mem_used[rows].astype(np.float64)
    else:
        cpu = view.cpu_load[rows] * view.cpus[rows]
        mem = view.mem_measured[rows]
    return static_scores(
        cpu,
        view.cpus[rows],
        mem=mem,
        maxmem=view.mem_total[rows].astype(np.float64),
        guest_cpu=demand.vcpus,
        guest_mem=float(demand.memory),
    )


WEIGHER = Weigher("crs", score)
