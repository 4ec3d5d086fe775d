"""pytest fixtures for real servers: one nats-server, a 3-node cluster, the multi-node harness.

Load it with ``pytest_plugins = ["rucher.testing.pytest_plugin"]`` in ``tests/conftest.py``.
Every fixture uses free ports and temporary folders, so tests never touch a stack started by
``ops/up``, and every fixture cleans up after a failed test too (the logs of the servers it ran
are printed with the failure).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Generator, Iterator
from pathlib import Path

import pytest

from rucher.testing.harness import Harness, prune
from rucher.testing.libvirt import libvirt_unavailable
from rucher.testing.nats import NatsCluster, NatsServer
from rucher.testing.netns import netns_unavailable

HarnessFactory = Callable[..., Harness]
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test item, so fixtures can tell a failed test apart."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


_RERUN_FAILURES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep why a test failed before a rerun (``pytest.mark.flaky``): the rerun may pass."""
    if str(report.outcome) == "rerun":
        parts = ["\n".join(report.longreprtext.splitlines()[-25:])]
        for title, content in report.sections:
            parts.append(f"--- {title}\n" + "\n".join(content.splitlines()[-15:]))
        _RERUN_FAILURES.append(f"{report.nodeid} ({report.when})\n" + "\n".join(parts))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the failure behind every rerun, so a flaky test's cause is never lost."""
    failures = _RERUN_FAILURES
    if failures:
        terminalreporter.section("failures that were rerun")
        for failure in failures:
            terminalreporter.write_line(failure)


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    # A failure that pytest-rerunfailures will retry is reported as "rerun": logs are kept too.
    return any(report.failed or str(report.outcome) == "rerun" for report in reports.values())


def _attach_logs(request: pytest.FixtureRequest, title: str, logs: list[Path]) -> None:
    """Attach the end of each log to the failed test's report (shown with the failure)."""
    for log in logs:
        if log.exists():
            lines = log.read_text(errors="replace").splitlines()[-40:]
            name = f"{log.parent.parent.name}/{log.name}" if log.parent.name == "logs" else log.name
            request.node.add_report_section("teardown", f"{title} {name}", "\n".join(lines))


def _started(server: NatsServer) -> NatsServer:
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture
def nats_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NatsServer]:
    """One real nats-server with JetStream on free 127.0.0.1 ports, for one test."""
    server = _started(NatsServer(name="nats-test", store_dir=tmp_path / "nats" / "store"))
    try:
        yield server
    finally:
        server.stop()
        if _failed(request):
            _attach_logs(request, "nats_server", [tmp_path / "nats" / "nats-test.log"])


@pytest.fixture(scope="module")
def nats_server_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One real nats-server with JetStream shared by every test of a module."""
    root = tmp_path_factory.mktemp("nats-module")
    server = _started(NatsServer(name="nats-module", store_dir=root / "store"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NatsCluster]:
    """Three nats-servers on 127.0.0.1 forming one JetStream cluster, for one test."""
    cluster = NatsCluster.create(tmp_path / "cluster", size=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if _failed(request):
            _attach_logs(request, "nats_cluster", sorted((tmp_path / "cluster").glob("*.log")))


@functools.cache
def _harness_unavailable() -> str | None:
    reason = netns_unavailable()
    if reason is None:
        # Runs left behind by test sessions that died (SIGKILL, power loss) are removed once.
        prune()
    return reason


@pytest.fixture
def harness_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[HarnessFactory]:
    """Build multi-node harnesses: ``harness_factory(nodes=3, start=True) -> Harness``.

    ``libvirt=True`` gives every node a libvirtd of its own, ``libvirt={"n1"}`` the nodes named
    (skipped where libvirtd cannot run); ``ceph=True`` one Ceph on the bridge that every node
    uses (skipped where Ceph is missing).

    Skips the test when network namespaces cannot be created here (not root, no iproute2).
    Every harness it built is torn down at the end of the test, whatever happened.
    """
    reason = _harness_unavailable()
    if reason is not None:
        pytest.skip(f"multi-node harness unavailable: {reason}")
    built: list[Harness] = []

    def build(
        nodes: int = 3,
        *,
        start: bool = True,
        libvirt: bool | Collection[str] = False,
        ceph: bool = False,
    ) -> Harness:
        if libvirt and (why := libvirt_unavailable()) is not None:
            pytest.skip(f"a libvirtd per node is unavailable: {why}")
        if ceph:
            from rucher.testing.ceph import ceph_unavailable  # imported late: see Harness

            if (why := ceph_unavailable()) is not None:
                pytest.skip(f"Ceph is unavailable: {why}")
        root = tmp_path / f"harness-{len(built) + 1}"
        harness = Harness(nodes, root, libvirt=libvirt, ceph=ceph)
        built.append(harness)
        return harness.start() if start else harness

    try:
        yield build
    finally:
        problems = []
        for harness in reversed(built):
            if _failed(request):
                logs = [log for node in harness.nodes for log in sorted(node.log_dir.glob("*.log"))]
                _attach_logs(request, f"harness {harness.run_id}", logs)
            try:
                harness.stop()
            except RuntimeError as err:
                problems.append(str(err))
        if problems:
            pytest.fail("; ".join(problems), pytrace=False)
