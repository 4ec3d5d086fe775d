"""Proxmox VE logic without I/O: roles, permission resolution, tickets, API tokens, TOTP."""
