"""Rucher compute agent: virtual machines through libvirt, in Proxmox's terms."""
