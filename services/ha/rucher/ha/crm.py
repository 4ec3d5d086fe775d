"""The cluster resource manager daemon of one node: wait for quorum, slave, or elected master.

Every node runs one; the one holding the manager lock is master and runs the
:class:`~rucher.ha.manager.Manager` each round under its watchdog. A master that cannot renew
the lock stops managing at once (``lost_manager_lock``), before its lock can expire for others.
"""

from __future__ import annotations

from rucher.ha.env import HaEnvironment
from rucher.ha.manager import Manager

MAX_LOCK_TRIES = 5


class Crm:
    """One node's CRM: its election state and, while master, its manager."""

    def __init__(self, env: HaEnvironment) -> None:
        """Start waiting for quorum."""
        self.env = env
        self.state = "startup"
        self.manager: Manager | None = None
        self.shutdown_requested = False
        self.watchdog: str | None = None
        self.cluster_state_ok = True
        self._set_state("wait_for_quorum")

    def shutdown_request(self) -> None:
        """Stop at the end of the next round (releasing the manager lock if master)."""
        if not self.shutdown_requested:
            self.env.log("info", "server received shutdown request")
        self.shutdown_requested = True

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.env.log("info", f"status change {self.state} => {state}")
        self.state = state
        self.manager = Manager(self.env) if state == "master" else None

    def _protected_lock(self) -> bool:
        for _ in range(MAX_LOCK_TRIES + 1):
            if self.env.get_manager_lock():
                if self.watchdog is None:
                    self.watchdog = self.env.watchdog_open()
                else:
                    self.env.watchdog_update(self.watchdog)
                return True
            self.env.sleep(1)
        return False

    def _can_get_active(self, allow_no_service: bool = False) -> bool:
        env = self.env
        if not env.quorate() or not self.cluster_state_ok:
            return False
        try:
            status = env.read_manager_status()
        except OSError as error:
            env.log("err", f"could not read manager status: {error}")
            return False
        me = env.nodename()
        if any(d.state == "fence" and d.node == me for d in status.service_status.values()):
            return False
        return allow_no_service or bool(env.read_service_config()) or env.has_crm_commands()

    def _close_watchdog(self) -> None:
        if self.watchdog is not None:
            self.env.watchdog_close(self.watchdog)
            self.watchdog = None

    def iterate(self, cluster_state_ok: bool = True) -> bool:  # noqa: PLR0911, PLR0912
        """One round; False when the daemon exits."""
        self.cluster_state_ok = cluster_state_ok
        env = self.env
        if self.state == "wait_for_quorum":
            if self._can_get_active():
                self._set_state("master" if self._protected_lock() else "slave")
        elif self.state == "slave":
            if self._can_get_active():
                if self._protected_lock():
                    self._set_state("master")
            else:
                self._set_state("wait_for_quorum")
        elif self.state == "lost_manager_lock":
            if self._can_get_active(True) and self._protected_lock():
                self._set_state("master")
        elif self.state == "master" and not self._protected_lock():
            self._set_state("lost_manager_lock")

        if self.state == "wait_for_quorum":
            return not self.shutdown_requested
        if self.state == "master":
            if self.shutdown_requested:
                self._close_watchdog()
                env.log("info", "voluntary release CRM lock")
                if not env.release_manager_lock():
                    env.log("notice", "CRM lock release failed, let the lock timeout")
                return False
            if not cluster_state_ok:
                env.log("notice", "temporary inconsistent cluster state (cfs restart?), skip round")
                return True
            assert self.manager is not None
            try:
                self.manager.manage()
            except OSError as error:
                env.log("err", f"got unexpected error - {error}")
            return True
        if self.state == "lost_manager_lock":
            self._close_watchdog()
            if self.shutdown_requested:
                return False
            self._set_state("wait_for_quorum")
            return True
        return not self.shutdown_requested
