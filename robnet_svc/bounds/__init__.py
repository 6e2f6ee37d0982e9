"""The bound engine (SPEC §3)."""
