"""vmkitd: the host service. FastAPI on uvicorn over a unix socket (and TLS on TCP when asked):
the REST API /1.0 over the same operations the CLI and SDK call, operations for long work,
events, metrics, a watcher that sees a QEMU end when it ends, and the restart policy."""
