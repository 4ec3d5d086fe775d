"""The manager's recovery when a chosen node refuses the guest for lack of room."""

from __future__ import annotations

from dataclasses import dataclass, field

from rucher.ha.env import NoRoomError
from rucher.ha.model import ServiceConfig, ServiceData
from rucher.ha.transitions import next_recovery


@dataclass
class Env:
    """Records steals and log lines; nodes in ``full`` refuse the guest."""

    full: set[str]
    stolen: list[tuple[str, str, str]] = field(default_factory=list)
    lines: list[tuple[str, str]] = field(default_factory=list)

    def steal_service(self, sid: str, current_node: str, new_node: str) -> None:
        if new_node in self.full:
            raise NoRoomError(f"node '{new_node}' has no room")
        self.stolen.append((sid, current_node, new_node))

    def log(self, level: str, message: str) -> None:
        self.lines.append((level, message))


@dataclass
class Manager:
    """What ``next_recovery`` uses of the manager: best score first, minus refused nodes."""

    env: Env
    order: list[str]
    ss: dict[str, ServiceData] = field(default_factory=dict)
    changes: list[tuple[str, str, str]] = field(default_factory=list)

    def select_service_node(
        self,
        sid: str,
        config: ServiceConfig,
        preference: str,
        exclude: frozenset[str] = frozenset(),
    ) -> str | None:
        return next((node for node in self.order if node not in exclude), None)

    def change_state(self, sid: str, new_state: str, **params: str) -> None:
        self.ss[sid].state = new_state
        self.changes.append((sid, new_state, params["node"]))


def recover(full: set[str]) -> tuple[Manager, ServiceConfig]:
    manager = Manager(Env(full), order=["b", "c", "d"])
    manager.ss["vm:100"] = ServiceData(state="recovery", node="a")
    config = ServiceConfig(sid="vm:100", node="a")
    next_recovery(manager, "vm:100", config)  # type: ignore[arg-type]
    return manager, config


def test_a_node_without_room_is_skipped_for_the_next_best():
    manager, config = recover(full={"b"})
    assert manager.env.stolen == [("vm:100", "a", "c")]
    assert manager.changes == [("vm:100", "started", "c")]
    assert config.node == "c" and manager.ss["vm:100"].node == "c"
    assert any("refused service 'vm:100'" in line for _, line in manager.env.lines)


def test_with_no_room_anywhere_the_service_stays_in_recovery():
    manager, config = recover(full={"b", "c", "d"})
    assert manager.env.stolen == [] and manager.changes == []
    assert manager.ss["vm:100"].state == "recovery" and config.node == "a"
    assert manager.env.lines[-1] == (
        "err",
        "recovering service 'vm:100' from fenced node 'a' failed, no recovery node found",
    )
