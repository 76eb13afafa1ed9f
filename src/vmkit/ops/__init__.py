"""Operations: one module per use case (lifecycle, snapshots, clones, bundles, live resources,
NICs, networks, images, host report). Each depends only on the engine core (vmkit.core) and the
adapters; the facades (vmkit.host: SDK Host/VM; vmkit.cli) call them, none re-implements them."""
