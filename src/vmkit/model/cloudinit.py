"""cloud-init NoCloud identity of a VM: what goes into its seed, and checks on user input.

The seed is a pure function of `CloudInit` (kept in vm.json), so a VM folder carries it and a
clone changes it by changing two fields: a new instance-id makes cloud-init treat the clone as a
new machine (new host keys, the new hostname) on its next boot.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct

from pydantic import BaseModel, ConfigDict, field_validator

from vmkit.errors import InvalidValue
from vmkit.model.names import is_dns_label

SEED_LABEL = "cidata"
KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
# First lines cloud-init recognises as a user-data format (besides #cloud-config).
_USER_DATA_STARTS = ("#!", "#include", "#cloud-boothook", "#part-handler", "#cloud-config-archive",
                     "#cloud-config-jsonp", "## template: jinja", "Content-Type:")
USER_DATA_LIMIT = 1 << 20  # bytes of user-data a VM may carry (clouds allow 16-256 KiB)
SSH_KEYS_LIMIT = 64
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class CloudInit(BaseModel):
    """The seed inputs of one VM."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    instance_id: str
    hostname: str
    ssh_keys: tuple[str, ...] = ()
    user_data: str | None = None  # the user's own, passed to the guest unchanged

    @field_validator("instance_id")
    @classmethod
    def _instance_id(cls, value: str) -> str:
        if not _INSTANCE_ID.fullmatch(value):
            raise InvalidValue(f"invalid cloud_init.instance_id {_shown(value)}: expected 1-128 "
                               "characters A-Z a-z 0-9 . _ -, e.g. vmkit-<uuid>")
        return value

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return validate_hostname(value, field="cloud_init.hostname")

    @field_validator("ssh_keys")
    @classmethod
    def _ssh_keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > SSH_KEYS_LIMIT:
            raise InvalidValue(f"invalid cloud_init.ssh_keys: {len(value)} keys, expected at "
                               f"most {SSH_KEYS_LIMIT}")
        for index, key in enumerate(value):
            where = f"cloud_init.ssh_keys[{index}]"
            # one key per entry, exactly as parse_ssh_public_keys keeps it: one line
            if not isinstance(key, str) or len(key) > 16384 or not key.isprintable() or \
                    parse_ssh_public_keys(key, where) != (key,):
                raise InvalidValue(f"invalid {where} {_shown(key)}: expected one SSH public key "
                                   "line, TYPE BASE64 [comment]")
        return value

    @field_validator("user_data")
    @classmethod
    def _user_data(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value.encode("utf-8", "surrogatepass")) > USER_DATA_LIMIT or "\0" in value:
            raise InvalidValue(f"invalid cloud_init.user_data {_shown(value)}: expected text "
                               f"without NUL bytes, at most {USER_DATA_LIMIT >> 10} KiB")
        return value


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def instance_id_for(vm_uuid: str) -> str:
    return f"vmkit-{vm_uuid}"


def validate_hostname(value: str, *, field: str = "hostname") -> str:
    """An RFC 1123 host name: dot-separated labels of a-z, 0-9 and inner hyphens."""
    labels = value.split(".")
    if len(value) > 253 or not all(is_dns_label(label) for label in labels):
        raise InvalidValue(f"invalid {field} {_shown(value)}",
                           hint="use lowercase letters, digits and inner hyphens, labels of at "
                                "most 63 characters separated by dots (e.g. db1)")
    return value


def parse_ssh_public_keys(text: str, source: str) -> tuple[str, ...]:
    """The public keys in an authorized_keys-style text; refuses private keys and garbage."""
    if "PRIVATE KEY" in text:
        raise InvalidValue(f"{source} is a private key",
                           hint="pass the public key (the .pub file next to it)")
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2 or fields[0] not in KEY_TYPES or not _blob_names(fields[1], fields[0]):
            raise InvalidValue(f"{source} line {number} is not an SSH public key",
                               hint="expected 'TYPE BASE64 [comment]' as in ~/.ssh/id_ed25519.pub")
        keys.append(line)
    if not keys:
        raise InvalidValue(f"{source} holds no SSH public key",
                           hint="pass a file such as ~/.ssh/id_ed25519.pub")
    return tuple(keys)


def _blob_names(blob: str, key_type: str) -> bool:
    """Whether a key's base64 blob decodes and starts with its own type (as OpenSSH writes it)."""
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(raw) < 4:
        return False
    (length,) = struct.unpack(">I", raw[:4])
    return raw[4:4 + length] == key_type.encode()


def check_user_data(text: str, source: str) -> str:
    """The user's user-data, unchanged, after checking cloud-init will understand it."""
    first = text.lstrip("\ufeff").split("\n", 1)[0].rstrip()
    if first == "#cloud-config":
        import yaml  # here, not at import: `vmkit list` loads this module, never parses YAML

        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidValue(f"{source} is not valid YAML: {exc}",
                               hint="fix the cloud-config (check indentation and colons)") from exc
        if parsed is not None and not isinstance(parsed, dict):
            raise InvalidValue(f"{source}: a cloud-config must be a mapping of keys "
                               f"(got a {type(parsed).__name__})",
                               hint="e.g. 'runcmd: [[touch, /root/ok]]'")
        return text
    if first.startswith(_USER_DATA_STARTS):
        return text
    raise InvalidValue(f"{source} is not user-data cloud-init understands (first line "
                       f"{first[:40]!r})",
                       hint="start it with #cloud-config (YAML) or #! (a script)")


def seed_files(ci: CloudInit) -> dict[str, bytes]:
    """The files of the NoCloud seed: meta-data (JSON is YAML) and user-data."""
    meta = {"instance-id": ci.instance_id, "local-hostname": ci.hostname,
            "public-keys": list(ci.ssh_keys)}
    user_data = ci.user_data if ci.user_data is not None else "#cloud-config\n{}\n"
    return {"meta-data": (json.dumps(meta, indent=2) + "\n").encode(),
            "user-data": user_data.encode()}
