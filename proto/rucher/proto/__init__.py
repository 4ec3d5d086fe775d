"""Rucher's bus contracts: messages, typed subjects, streams and buckets. Pure data, no I/O."""
