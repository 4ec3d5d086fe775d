"""The gateway's endpoints, one module per area of the Proxmox API."""
