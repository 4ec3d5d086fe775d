"""Rucher storage service: storage definitions, volumes on dir and Ceph RBD pools, uploads."""
