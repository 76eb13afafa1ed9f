"""Held lock tokens: a function that needs a VM's lock gets proof, checked, not a convention."""

from __future__ import annotations

import pytest

from vmkit.core.locks import Held


def test_a_token_proves_the_lock_of_its_vm_while_held() -> None:
    held = Held("web")
    held.require("web")
    with pytest.raises(RuntimeError, match="for VM 'web'"):
        held.require("db")
    held.release()
    with pytest.raises(RuntimeError, match="released"):
        held.require("web")
