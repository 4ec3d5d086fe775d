"""Hypervisor drivers of the compute agent: a Protocol and one module per backend."""
