"""Rucher GPU broker: discovery, passthrough, mdev vGPU, MIG and SR-IOV VF leases."""
