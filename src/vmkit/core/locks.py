"""Held locks as values. A function that must run under a VM's lock takes the `Held` token its
caller got from `Host._vm_lock(name)`; it checks the token names its VM and is still held, so
"the caller holds the lock" is a parameter the type checker sees, not a naming convention."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(eq=False)
class Held:
    """Proof that this process holds VM `vm`'s lock (until the `with` block that made it ends)."""

    vm: str
    _live: bool = field(default=True, repr=False)

    def require(self, vm: str) -> None:
        if not self._live or self.vm != vm:
            state = "released" if not self._live else f"for VM {self.vm!r}"
            raise RuntimeError(f"VM {vm!r} needs its lock held; the token given is {state}")

    def release(self) -> None:
        self._live = False
