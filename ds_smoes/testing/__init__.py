"""Instruments for tests and audits, not used by training or serving.

    host_syncs.py   counting device-to-host synchronisations on any device (CPU included)

A layer of its own below every other: any test may import it, no module of the package does.
"""
