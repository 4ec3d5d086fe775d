"""High availability: the Proxmox-compatible HA decision core (manager and node part) and its simulator."""
