"""Test support: real nats-server processes, the multi-node harness, and the pytest plugin."""
