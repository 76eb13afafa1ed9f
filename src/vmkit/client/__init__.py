"""Clients of the host service: the remote SDK (same methods as Host/VM), the remotes the CLI
knows, and how the CLI finds the local daemon. Imports none of the engine."""
