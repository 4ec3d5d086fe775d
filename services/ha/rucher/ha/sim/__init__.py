"""A simulated cluster with a virtual clock that runs Proxmox's HA regression scenarios."""
