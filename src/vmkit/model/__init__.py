"""Pure core: names, sizes, specs, states and resource arithmetic. No I/O here."""
