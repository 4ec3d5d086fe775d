"""Rucher IAM service: identities, realms, permissions, tickets and API tokens."""
