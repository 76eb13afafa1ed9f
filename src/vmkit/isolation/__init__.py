"""Adapters that fence a VM's QEMU in: cgroups (v1 and v2 behind one interface)."""
