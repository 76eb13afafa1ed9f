"""The waits a user can change (seconds): the engine's defaults, and the CLI's, which reads
them without importing the engine (a command that goes through a daemon never loads it)."""

LOCK_TIMEOUT = 30.0          # another command working on the same VM
AGENT_READY_TIMEOUT = 180.0  # a start --wait: until the guest agent answers
STOP_TIMEOUT = 30.0          # a clean shutdown before the kill
EXEC_TIMEOUT = 60.0          # a command run in the guest
