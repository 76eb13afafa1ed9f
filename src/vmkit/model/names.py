"""Names of VMs, images, snapshots and networks: DNS labels, checked before any file is touched."""

from __future__ import annotations

import re

from vmkit.errors import InvalidValue

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def is_dns_label(value: str) -> bool:
    return bool(_DNS_LABEL.fullmatch(value))


def validate_name(value: str, *, kind: str = "VM name") -> str:
    """Return `value` if it is a DNS label: safe as a hostname, a folder and a QEMU option."""
    if not isinstance(value, str) or not is_dns_label(value):
        shown = value if isinstance(value, str) else repr(value)
        too_long = isinstance(value, str) and len(value) > 63
        reason = "too long (63 characters at most)" if too_long else "not a DNS label"
        raise InvalidValue(
            f"invalid {kind} {shown!r}: {reason}",
            hint="use 1-63 characters a-z, 0-9 and '-', starting and ending with a letter or digit",
        )
    return value
