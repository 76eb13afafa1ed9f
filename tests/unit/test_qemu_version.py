import pytest

from vmkit.errors import HostError, exit_code_for
from vmkit.qemu import hostinfo


def test_qemu_older_than_10_is_refused_with_a_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostinfo, "qemu_version", lambda: (7, 2, 0))
    with pytest.raises(HostError) as info:
        hostinfo.require_supported_qemu()
    assert "QEMU 7.2.0 is not supported" in info.value.message
    assert info.value.hint is not None and "bookworm-backports" in info.value.hint
    assert exit_code_for(info.value) == 1


def test_qemu_10_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostinfo, "qemu_version", lambda: (10, 0, 2))
    assert hostinfo.require_supported_qemu() == (10, 0, 2)
