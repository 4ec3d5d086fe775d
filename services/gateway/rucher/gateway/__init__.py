"""The gateway: Rucher's Proxmox VE compatible REST API, served over HTTPS on port 8006."""
