"""Engine core: what every operation stands on (the journal; next the VM store, locks and the
runtime move here from host.py)."""
