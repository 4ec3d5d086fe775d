"""Fixtures of the gateway's integration tests: one stack per module, a logged-in admin."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rucher.testing.nats import NatsServer

from .stack import ADMIN, ADMIN_PASSWORD, Api, Stack, logged_in, start_stack


@pytest.fixture(scope="module")
def stack(
    nats_server_module: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """IAM and the gateway on one nats-server, shared by a test module."""
    root: Path = tmp_path_factory.mktemp("gateway-stack")
    running = start_stack(nats_server_module.url, root)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[Api]:
    """A client logged in as the bootstrap administrator."""
    api = await logged_in(stack, ADMIN, ADMIN_PASSWORD)
    try:
        yield api
    finally:
        await api.close()


@pytest.fixture
async def anonymous(stack: Stack) -> AsyncIterator[Api]:
    """A client without credentials."""
    api = Api(stack)
    try:
        yield api
    finally:
        await api.close()
