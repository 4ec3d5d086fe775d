"""A connection to one Ceph pool through Debian's ``rados``/``rbd`` bindings, off the event loop.

The bindings load on first use only (an idle node without RBD storage never maps librados), the
connection opens lazily and is shared by every worker thread (librados is thread-safe), and
library exceptions become :class:`~rucher.bus.RucherError` codes in one table.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, TypeVar

from rucher.bus import RucherError
from rucher.proto.errors import ErrorCode
from rucher.proto.storage import StorageDefinition

T = TypeVar("T")
DEFAULT_TIMEOUTS = {
    "client_mount_timeout": "10",
    "rados_mon_op_timeout": "15",
    "rados_osd_op_timeout": "60",
}


def bindings() -> tuple[ModuleType, ModuleType]:
    """Debian's ``rados`` and ``rbd`` modules; ``unsupported`` when they are not installed."""
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as err:
        raise RucherError(
            ErrorCode.UNSUPPORTED,
            "the rados/rbd Python bindings are not installed on this node (ops/ceph install)",
        ) from err


def bare_key(keyring: str) -> str:
    """The cephx secret from a keyring file's text (``key = ...``), or the text itself."""
    for line in keyring.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == "key":
            return value.strip()
    return keyring.strip()


class CephPool:
    """One pool of the cluster a storage definition names, as ``client.<username>``."""

    def __init__(
        self, definition: StorageDefinition, key: str | None, settings: dict[str, str]
    ) -> None:
        self.definition = definition
        self.pool = definition.pool or "rbd"
        self.username = definition.username or "admin"
        self.key = key
        self.settings = {**DEFAULT_TIMEOUTS, **settings}
        self.rados, self.rbd = bindings()
        self._lock = threading.Lock()
        self._cluster: Any = None
        self._ioctx: Any = None

    def _io(self) -> Any:
        with self._lock:
            if self._ioctx is None:
                conf = {"mon_host": ",".join(self.definition.monhost), **self.settings}
                if self.key:
                    conf["key"] = self.key
                cluster = self.rados.Rados(rados_id=self.username, conffile=None, conf=conf)
                try:
                    cluster.connect(timeout=int(self.settings["client_mount_timeout"]))
                    self._ioctx = cluster.open_ioctx(self.pool)
                except BaseException:
                    with contextlib.suppress(self.rados.Error):
                        cluster.shutdown()
                    raise
                self._cluster = cluster
            return self._ioctx

    def error(self, err: Exception, what: str) -> RucherError:
        """The :class:`RucherError` for a library exception."""
        rados, rbd = self.rados, self.rbd
        table: list[tuple[tuple[type[BaseException], ...], ErrorCode]] = [
            ((rbd.ImageNotFound, rados.ObjectNotFound), ErrorCode.NOT_FOUND),
            ((rbd.ImageExists, rados.ObjectExists), ErrorCode.EXISTS),
            ((rbd.ImageBusy, rbd.ImageHasSnapshots, rados.ObjectBusy), ErrorCode.CONFLICT),
            ((rbd.InvalidArgument, rados.InvalidArgumentError), ErrorCode.INVALID),
            ((rbd.NoSpace, rados.NoSpace, rbd.DiskQuotaExceeded), ErrorCode.INVALID),
            ((rados.PermissionDeniedError, rados.PermissionError, rbd.PermissionError),
             ErrorCode.UNAVAILABLE),
            ((rados.TimedOut, rados.ConnectionShutdown, rbd.Timeout, rbd.ConnectionShutdown,
              rados.InterruptedOrTimeoutError), ErrorCode.UNAVAILABLE),
        ]  # fmt: skip
        code = next((code for kinds, code in table if isinstance(err, kinds)), ErrorCode.INTERNAL)
        return RucherError(code, f"{what}: {err}", details={"storage": self.definition.storage})

    async def run(self, what: str, work: Callable[[Any], T]) -> T:
        """Run ``work(ioctx)`` in a worker thread; library errors become :class:`RucherError`."""

        def call() -> T:
            try:
                return work(self._io())
            except (self.rados.Error, self.rbd.Error) as err:
                raise self.error(err, what) from err

        return await asyncio.to_thread(call)

    @contextlib.contextmanager
    def image(
        self, ioctx: Any, name: str, *, snapshot: str | None = None, read_only: bool = False
    ) -> Iterator[Any]:
        """An open image (blocking: inside :meth:`run` only), closed on leaving."""
        image = self.rbd.Image(ioctx, name, snapshot=snapshot, read_only=read_only)
        try:
            yield image
        finally:
            image.close()

    def df(self) -> dict[str, Any] | None:
        """This pool's ``ceph df`` statistics (blocking: inside :meth:`run` only)."""
        command = json.dumps({"prefix": "df", "format": "json"})
        result, out, message = self._cluster.mon_command(command, b"", timeout=10)
        if result != 0:
            raise RucherError(ErrorCode.UNAVAILABLE, f"ceph df failed: {message}")
        for pool in json.loads(out)["pools"]:
            if pool["name"] == self.pool:
                stats: dict[str, Any] = pool["stats"]
                return stats
        return None

    async def close(self) -> None:
        """Close the pool and the cluster connection."""

        def shutdown() -> None:
            with self._lock:
                if self._ioctx is not None:
                    self._ioctx.close()
                if self._cluster is not None:
                    self._cluster.shutdown()
                self._ioctx = self._cluster = None

        await asyncio.to_thread(shutdown)
