"""High availability: the Proxmox-compatible HA decision core (CRM and LRM) and its simulator."""
