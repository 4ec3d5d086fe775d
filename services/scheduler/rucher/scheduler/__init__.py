"""The scheduler service: where guests run, reserved by atomic claims in the cluster store."""
