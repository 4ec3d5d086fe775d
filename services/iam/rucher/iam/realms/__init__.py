"""Authentication realms: one module per kind (pve, pam, openid)."""
