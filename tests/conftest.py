"""Fixtures shared by every test folder: real nats-servers, a 3-node cluster, the harness."""

# pytester runs an inner pytest session to check that fixtures clean up after failed tests.
pytest_plugins = ["rucher.testing.pytest_plugin", "pytester"]
