"""Adapter to the file system: the VMKIT_HOME layout, VM folders, atomic writes, locks."""
