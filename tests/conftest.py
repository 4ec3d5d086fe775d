"""Fixtures shared by every test folder: real nats-servers, a 3-node cluster, the harness."""

from rucher.service.logging import configure_logging
from rucher.service.settings import LogFormat

# pytester runs an inner pytest session to check that fixtures clean up after failed tests.
pytest_plugins = ["rucher.testing.pytest_plugin", "pytester"]

# Plain key=value lines with plain tracebacks in captured output, as the services log.
configure_logging(LogFormat.CONSOLE, "debug", service="tests")
