#!/usr/bin/env bash
# Installs the host packages vmkit needs on Debian 12 (QEMU 10 from bookworm-backports)
# or Debian 13 (QEMU from the main suite). Idempotent: a second run changes nothing.
# The backports suite is added on the mirror URI the machine already uses; no mirror is hard-coded.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-host-deps: run as root (apt-get needs it)" >&2
  exit 2
fi

. /etc/os-release
codename=${VERSION_CODENAME:-}
# gcc + libc6-dev: the tiny image compiles its static vmkit-reseed helper.
# seabios: the firmware of VMs with a vmgenid device (qboot cannot run its ACPI write-pointer)
# and of --firmware bios; ovmf: --firmware uefi (code and the NVRAM template); swtpm: a
# VM's TPM 2.0 (--os-type windows).
# grub-*, xorriso, mtools: the tests build a bootable installer/foreign disk from Debian packages.
tools="qemu-utils busybox-static cpio zstd lz4 xz-utils kmod e2fsprogs debootstrap python3-venv iproute2 socat openssh-client nftables dnsmasq-base gcc libc6-dev seabios ovmf swtpm grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools dosfstools"

first_debian_uri() {
  # Reads the first Debian archive URI from deb822 sources, then from one-line sources.
  local uri=""
  if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
    uri=$(awk 'tolower($1)=="uris:" {for (i=2;i<=NF;i++) if ($i !~ /security/) {print $i; exit}}' \
          /etc/apt/sources.list.d/*.sources | head -n1)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $0 !~ /security/ {for (i=2;i<=NF;i++) if ($i ~ /^(https?|file|ftp):/) {print $i; exit}}' \
          /etc/apt/sources.list | head -n1)
  fi
  echo "$uri"
}

need_update=0
stamp=/var/lib/apt/periodic/vmkit-update-stamp
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +720 2>/dev/null)" ]; then
  need_update=1
fi

if [ "$codename" = "bookworm" ]; then
  list=/etc/apt/sources.list.d/vmkit-backports.sources
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    uri=$(first_debian_uri)
    if [ -z "$uri" ]; then
      echo "install-host-deps: no Debian mirror URI found in /etc/apt/sources.list(.d); add bookworm-backports by hand" >&2
      exit 1
    fi
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$list"
    need_update=1
  fi
  qemu_target="-t bookworm-backports"
else
  qemu_target=""
fi

missing=0
for p in qemu-system-x86 qemu-utils $tools; do
  dpkg -s "$p" >/dev/null 2>&1 || missing=1
done
if command -v qemu-system-x86_64 >/dev/null; then
  major=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p')
  [ "${major:-0}" -ge 10 ] || missing=1
else
  missing=1
fi

if [ "$missing" = 1 ]; then
  if [ "$need_update" = 1 ]; then
    apt-get update -q
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
  fi
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $qemu_target qemu-system-x86 qemu-utils
  # shellcheck disable=SC2086
  apt-get install -y -q --no-install-recommends $tools
fi
# The web dashboard's tests drive Debian's chromium; its JavaScript comes from npm (web/).
web_missing=""
dpkg -s chromium >/dev/null 2>&1 || web_missing="chromium"
command -v npm >/dev/null || web_missing="$web_missing nodejs npm"
if [ -n "$web_missing" ]; then
  if [ "$need_update" = 1 ]; then
    apt-get update -q
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
  fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $web_missing
fi
# QEMU runs as this unprivileged user when vmkit runs as root (the jailer model).
if ! getent passwd vmkit >/dev/null; then
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin vmkit
fi
qemu-system-x86_64 --version | head -n1
