"""The local resource manager of one node: runs the manager's commands under the node's lease.

It holds the node's agent lock (its lease) while it has active HA services and feeds the
watchdog each round; losing the lock leaves the watchdog to stop the node's guests before the
lock can expire for the manager, which is what makes the manager's fence safe. On shutdown it
applies the shutdown policy (freeze, fail over, or migrate away through maintenance mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rucher.ha.env import HaEnvironment
from rucher.ha.model import ExitCode, LrmResult, LrmStatus, ServiceData

MAX_ACTIVE_IDLE_ROUNDS = 60
MAX_LOCK_TRIES = 5


@dataclass
class Worker:
    """A queued resource command (``uid`` None marks a shutdown stop job)."""

    sid: str
    uid: str | None
    state: str
    target: str | None = None
    timeout: int | None = None


@dataclass
class Lrm:
    """One node's LRM."""

    env: HaEnvironment
    state: str = "startup"
    mode: str = "active"
    shutdown_requested: bool = False
    shutdown_errors: int = 0
    watchdog: str | None = None
    active_idle_rounds: int = 0
    workers: dict[str, Worker] = field(default_factory=dict)
    results: dict[str, LrmResult] = field(default_factory=dict)
    restart_tries: dict[str, int] = field(default_factory=dict)
    service_status: dict[str, ServiceData] = field(default_factory=dict)
    node_status: str = "unknown"
    disarm_requested: bool = False
    cluster_state_ok: bool = True

    def __post_init__(self) -> None:
        """Start waiting for the agent lock."""
        self._set_state("wait_for_agent_lock")

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.env.log("info", f"status change {self.state} => {state}")
        self.state = state

    # --- shutdown --------------------------------------------------------------------------

    def shutdown_request(self) -> None:  # noqa: PLR0912
        """Node shutdown or LRM restart: apply the shutdown policy."""
        if self.shutdown_requested:
            return
        env = self.env
        node = env.nodename()
        shutdown, reboot = env.is_node_shutdown()
        policy = env.cluster_settings().shutdown_policy
        if shutdown:
            env.log("info", f"got shutdown request with shutdown policy '{policy}'")
        maintenance = False
        if policy == "conditional":
            freeze_all = reboot
        elif policy == "freeze":
            freeze_all = True
        elif policy == "failover":
            freeze_all = False
        elif policy == "migrate":
            freeze_all, maintenance = False, True
        else:
            env.log("err", f"unknown shutdown policy '{policy}', fall back to conditional")
            freeze_all = reboot
        manual = shutdown and self.mode == "maintenance"
        if manual:
            maintenance = True
        if shutdown and not maintenance:
            for sid, data in self.service_status.items():
                if data.node == node:
                    self._queue(Worker(sid=sid, uid=None, state="request_stop"))
        if shutdown:
            kind = "reboot" if reboot else "shutdown"
            if manual:
                env.log(
                    "info",
                    f"{kind} LRM, ignore {policy} policy as manual maintenance mode is enabled",
                )
            elif maintenance:
                env.log(
                    "info", f"{kind} LRM, doing maintenance, removing this node from active list"
                )
                self.mode = "maintenance"
            elif freeze_all:
                env.log("info", f"{kind} LRM, stop and freeze all services")
                self.mode = "restart"
            else:
                env.log("info", "shutdown LRM, stop all services")
                self.mode = "shutdown"
        else:
            env.log("info", "restart LRM, freeze all services")
            self.mode = "restart"
        self.shutdown_requested = True
        self.publish()

    # --- status ----------------------------------------------------------------------------

    def publish(self) -> bool:
        """Write this node's LRM status (only while quorate)."""
        if not self.env.quorate():
            return False
        status = LrmStatus(
            state=self.state, mode=self.mode, results=dict(self.results), timestamp=self.env.now()
        )
        try:
            self.env.write_lrm_status(status)
        except OSError as error:
            self.env.log("err", f"unable to write lrm status file - {error}")
            return False
        return True

    def update_service_status(self) -> bool:
        """Read the manager's view of this node's services, maintenance and disarm requests."""
        try:
            status = self.env.read_manager_status()
        except OSError as error:
            self.env.log("err", f"updating service status from manager failed: {error}")
            return False
        node = self.env.nodename()
        self.service_status = status.service_status
        self.node_status = status.node_status.get(node, "unknown")
        self.disarm_requested = status.disarm is not None and not status.disarm.rearm
        if not self.shutdown_requested:
            if status.node_request.get(node, {}).get("maintenance"):
                self.mode = "maintenance"
            elif self.mode == "maintenance":
                self.mode = "active"
        return True

    def _protected_lock(self) -> bool:
        for _ in range(MAX_LOCK_TRIES + 1):
            if self.env.get_agent_lock():
                if self.watchdog is None:
                    self.watchdog = self.env.watchdog_open()
                else:
                    self.env.watchdog_update(self.watchdog)
                return True
            self.env.sleep(1)
        return False

    def _give_up_watchdog(self) -> None:
        if self.watchdog is not None:
            self.env.watchdog_close(self.watchdog)
            self.watchdog = None

    def _mine(self) -> list[tuple[str, ServiceData]]:
        node = self.env.nodename()
        return [(sid, d) for sid, d in sorted(self.service_status.items()) if d.node == node]

    def active_service_count(self) -> int:
        """Services on this node that HA must protect (not stopped, frozen or in error)."""
        return sum(1 for _, d in self._mine() if d.state not in ("stopped", "freeze", "error"))

    def fence_requested(self) -> bool:
        """Whether the manager is fencing this node."""
        return self.node_status == "fence" or any(d.state == "fence" for _, d in self._mine())

    def _release(self, message: str) -> None:
        self.env.log("info", message)
        self.env.release_agent_lock()
        self._give_up_watchdog()
        self.mode = "disarm" if self.mode == "active" else self.mode
        self._set_state("wait_for_agent_lock")

    # --- the round -------------------------------------------------------------------------

    def iterate(self, cluster_state_ok: bool = True) -> bool:  # noqa: PLR0912
        """One round; False when the daemon exits."""
        self.cluster_state_ok = cluster_state_ok
        env = self.env
        self.update_service_status()
        if not self.disarm_requested and self.mode == "disarm":
            self.mode = "active"
        fence = self.fence_requested()
        if self.state == "wait_for_agent_lock":
            if (
                not fence
                and not self.disarm_requested
                and self.active_service_count()
                and env.quorate()
                and self._protected_lock()
            ):
                self._set_state("active")
        elif self.state == "lost_agent_lock":
            if not fence and env.quorate() and self._protected_lock():
                self._set_state("active")
        elif self.state == "active":
            if fence:
                env.log("err", "node need to be fenced - releasing agent_lock")
                self._set_state("lost_agent_lock")
            elif not self._protected_lock():
                self._set_state("lost_agent_lock")
            elif self.disarm_requested:
                self._release("HA disarm requested, releasing agent lock and watchdog")
            elif self.mode == "maintenance":
                self._set_state("maintenance")
            elif not self._mine() and not self.workers:
                self.active_idle_rounds += 1
                if self.active_idle_rounds > MAX_ACTIVE_IDLE_ROUNDS:
                    env.log(
                        "info",
                        f"node had no service configured for {MAX_ACTIVE_IDLE_ROUNDS} rounds, "
                        "going idle.",
                    )
                    env.release_agent_lock()
                    self._give_up_watchdog()
                    self._set_state("wait_for_agent_lock")
                    self.active_idle_rounds = 0
            else:
                self.active_idle_rounds = 0
        elif self.state == "maintenance":
            if fence:
                env.log(
                    "err", "node need to be fenced during maintenance mode - releasing agent_lock"
                )
                self._set_state("lost_agent_lock")
            elif not self._protected_lock():
                self._set_state("lost_agent_lock")
            elif self.disarm_requested and self.mode != "maintenance":
                self._release(
                    "HA disarm requested during maintenance, releasing agent lock and watchdog"
                )
            elif self.mode == "active":
                self._set_state("active")
        return self._work()

    def _work(self) -> bool:  # noqa: PLR0912
        env = self.env
        if self.state == "wait_for_agent_lock":
            if self.shutdown_requested:
                return False
            self.publish()
            return True
        if self.state == "active":
            done = False
            if self.shutdown_requested:
                if self.mode == "restart":
                    workers = self.run_workers()
                    if self.active_service_count() == 0 and workers == 0:
                        self._give_up_watchdog()
                        done = True
                        env.release_agent_lock()
                elif self.run_workers() == 0:
                    if self.shutdown_errors == 0:
                        self._give_up_watchdog()
                        env.release_agent_lock()
                    done = True
            elif not self.cluster_state_ok:
                env.log("notice", "temporary inconsistent cluster state (cfs restart?), skip round")
            else:
                self.manage_resources()
            self.publish()
            return not done
        if self.state == "lost_agent_lock":
            if self.shutdown_requested:
                count = self.active_service_count()
                if count > 0:
                    env.log(
                        "err",
                        "get shutdown request in state 'lost_agent_lock' - "
                        f"detected {count} running services",
                    )
                else:
                    self._give_up_watchdog()
                    return False
            return True
        if self.state == "maintenance":
            exit_lrm = False
            if (
                self.shutdown_requested
                and self.active_service_count() == 0
                and self.run_workers() == 0
            ):
                self._give_up_watchdog()
                exit_lrm = True
                env.release_agent_lock()
            if not exit_lrm:
                self.manage_resources()
            self.publish()
            return not exit_lrm
        raise RuntimeError(f"got unexpected status '{self.state}'")

    # --- resource commands -----------------------------------------------------------------

    def _queue(self, worker: Worker) -> None:
        if worker.state != "stopped" and worker.uid and worker.uid in self.results:
            return
        self.workers[worker.sid] = worker

    def manage_resources(self) -> int:
        """Queue the manager's command for each service on this node, then run them."""
        for sid in list(self.restart_tries):
            if sid not in self.service_status:
                del self.restart_tries[sid]
        for sid, data in self._mine():
            if not data.uid or data.state in ("recovery", "freeze"):
                continue
            self._queue(
                Worker(
                    sid=sid,
                    uid=data.uid,
                    state=data.state,
                    target=data.target,
                    timeout=data.timeout,
                )
            )
        return self.run_workers()

    def run_workers(self) -> int:
        """Run every queued command (the simulator runs them inline); the count left."""
        for sid in sorted(self.workers):
            worker = self.workers.pop(sid)
            code = self.execute(worker)
            if worker.uid is None:
                if code != ExitCode.SUCCESS:
                    self.shutdown_errors += 1
                continue
            code = self._restart_policy(sid, worker.state, code)
            if code == ExitCode.ETRY_AGAIN:
                continue
            self.results[worker.uid] = LrmResult(sid=sid, state=worker.state, exit_code=code)
            valid = {d.uid for d in self.service_status.values() if d.uid}
            self.results = {uid: r for uid, r in self.results.items() if uid in valid}
        return len(self.workers)

    def _restart_policy(self, sid: str, command: str, code: int) -> int:
        if command != "started":
            return code
        if code == ExitCode.SUCCESS:
            self.restart_tries[sid] = 0
            return code
        if code != ExitCode.ERROR:
            return code
        config = self.env.read_service_config().get(sid)
        max_restart = config.max_restart if config else 0
        tries = self.restart_tries.setdefault(sid, 0)
        if tries >= max_restart:
            self.env.log(
                "err", f"unable to start service {sid} on local node after {tries} retries"
            )
            self.restart_tries[sid] = 0
            return ExitCode.ERROR
        self.restart_tries[sid] = tries + 1
        self.env.log("warning", f"restart policy: retry number {tries + 1} for service '{sid}'")
        return ExitCode.ETRY_AGAIN

    def execute(self, worker: Worker) -> int:  # noqa: PLR0911, PLR0912
        """Carry out one resource command on this node."""
        env = self.env
        sid, command = worker.sid, worker.state
        config = env.read_service_config().get(sid)
        if config is None:
            env.log("err", f"missing resource configuration for '{sid}'")
            return ExitCode.EUNKNOWN_SERVICE
        if command == "error":
            env.log(
                "err",
                f"service {sid} is in an error state and needs manual intervention. "
                "Look up 'ERROR RECOVERY' in the documentation.",
            )
            return ExitCode.SUCCESS
        if config.node != env.nodename():
            env.log("err", f"service '{sid}' not on this node")
            return ExitCode.EWRONG_NODE
        running = env.check_running(sid)
        if command == "started":
            if running:
                return ExitCode.SUCCESS
            env.log("info", f"starting service {sid}")
            env.start(sid)
            if env.check_running(sid):
                env.log("info", f"service status {sid} started")
                return ExitCode.SUCCESS
            env.log("warning", f"unable to start service {sid}")
            return ExitCode.ERROR
        if command in ("request_stop", "stopped"):
            if not running:
                return ExitCode.SUCCESS
            if worker.timeout is not None:
                env.log("info", f"stopping service {sid} (timeout={worker.timeout})")
            else:
                env.log("info", f"stopping service {sid}")
            env.shutdown(sid, worker.timeout)
            if not env.check_running(sid):
                env.log("info", f"service status {sid} stopped")
                return ExitCode.SUCCESS
            env.log("info", f"unable to stop stop service {sid} (still running)")
            return ExitCode.ERROR
        if command in ("migrate", "relocate", "request_start_balance"):
            target = worker.target
            if target is None:
                return ExitCode.EINVALID_PARAMETER
            if config.node == target:
                return ExitCode.SUCCESS
            if command == "request_start_balance" and running:
                env.log("info", f"ignoring rebalance-on-start for service {sid} - already running")
                return ExitCode.IGNORED
            online = command == "migrate" and config.type == "vm"
            if not env.migrate(sid, target, online):
                env.log("err", f"service {sid} not moved (migration error)")
                return ExitCode.ERROR
            return ExitCode.SUCCESS
        env.log("err", f"implement me (cmd '{command}')")
        return ExitCode.EUNKNOWN_COMMAND
