"""Debian packages for image builds: resolve versions, download once into a cache, extract."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmkit.errors import ImageBuildError


@dataclass(frozen=True)
class Package:
    name: str
    version: str


def _run(argv: list[str], *, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{argv[0]} is not installed", hint="run make run (it installs "
                              "the build tools)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{' '.join(argv[:3])} took longer than {timeout:g}s") from exc
    if done.returncode != 0:
        raise ImageBuildError(f"{' '.join(argv[:3])} failed (exit code {done.returncode})",
                              detail=done.stderr.strip()[-2000:])
    return done.stdout


def resolve_kernel_package(metapackage: str) -> str:
    """linux-image-cloud-amd64 -> linux-image-6.1.0-NN-cloud-amd64 (what the meta depends on)."""
    out = _run(["apt-cache", "depends", metapackage])
    match = re.search(r"Depends: (linux-image-[\w.+-]+)", out)
    if not match:
        raise ImageBuildError(f"cannot resolve the kernel package of {metapackage}",
                              hint="run apt-get update", detail=out)
    return match.group(1)


def library_dependencies(packages: list[str]) -> list[str]:
    """Shared-library packages the given packages pull in (recursively), from apt's metadata."""
    out = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *packages])
    names = {line.strip() for line in out.splitlines() if line and not line.startswith(" ")}
    return sorted(n for n in names if n.startswith("lib") and "perl" not in n and "<" not in n)


def candidate_versions(names: list[str]) -> list[Package]:
    out = _run(["apt-cache", "show", "--no-all-versions", *names])
    found: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("Package: "):
            current = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and current and current not in found:
            found[current] = line.split(": ", 1)[1]
    missing = [n for n in names if n not in found]
    if missing:
        raise ImageBuildError(f"Debian packages not found: {', '.join(missing)}",
                              hint="run apt-get update")
    return [Package(n, found[n]) for n in names]


def newer_available(installed: dict[str, str], suites: list[str]) -> list[str]:
    """The packages of `installed` (name -> version) of which this host's apt lists have a
    newer version in one of `suites` (the suites the image was built from: a backport the
    host itself runs does not count). Packages apt does not know are left out."""
    if not installed:
        return []
    done = subprocess.run(["apt-cache", "madison", *sorted(installed)], capture_output=True,
                          text=True, timeout=120, check=False)
    offered: dict[str, set[str]] = {}
    for line in done.stdout.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) < 3:
            continue
        name, version, where = parts[:3]
        suite = where.split()[1].split("/")[0] if len(where.split()) > 1 else ""
        if suite in suites and version != installed.get(name):
            offered.setdefault(name, set()).add(version)
    return sorted(name for name, versions in offered.items()
                  if any(_newer(version, installed[name]) for version in versions))


def _newer(version: str, than: str) -> bool:
    return subprocess.run(["dpkg", "--compare-versions", version, "gt", than], timeout=30,
                          check=False).returncode == 0


def unknown_packages(names: list[str]) -> list[str]:
    """The names apt has no installable version of."""
    if not names:
        return []
    done = subprocess.run(["apt-cache", "policy", *names], capture_output=True, text=True,
                          timeout=120, check=False)
    known = {m.group(1) for m in re.finditer(r"^(\S+):\n\s+Installed: .*\n\s+Candidate: "
                                              r"(?!\(none\))", done.stdout, re.M)}
    return [n for n in names if n not in known]


def download(packages: list[Package], cache: Path,
             progress: Callable[[str], None] | None = None) -> list[Path]:
    """The .deb of each package, downloaded with apt-get into cache/<name>/<version>/ once."""
    debs: list[Path] = []
    for pkg in packages:
        folder = cache / pkg.name / pkg.version.replace(":", "%3a")
        existing = sorted(folder.glob("*.deb"))
        if not existing:
            folder.mkdir(parents=True, exist_ok=True)
            if progress:
                progress(f"downloading {pkg.name} {pkg.version}")
            _run(["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"], cwd=folder)
            existing = sorted(folder.glob("*.deb"))
            if not existing:
                raise ImageBuildError(f"apt-get download {pkg.name} produced no .deb")
        debs.append(existing[0])
    return debs


def extract(deb: Path, target: Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(target)])


def parse_mirrors(texts: list[str], suite: str) -> list[str]:
    """Mirror URIs offering `suite` with component main, from sources.list / deb822 texts."""
    found: list[str] = []
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                line = line.split("#", 1)[0].rstrip()
                one_line = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line)
                if one_line:
                    uri, line_suite, components = one_line.groups()
                    if line_suite == suite and "main" in components.split():
                        found.append(uri.rstrip("/"))
                elif ":" in line and not line.startswith((" ", "\t")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and \
                    suite in fields.get("suites", "").split() and \
                    "main" in fields.get("components", "").split():
                found += [uri.rstrip("/") for uri in fields.get("uris", "").split()]
    return list(dict.fromkeys(found))


def host_mirrors(suite: str) -> list[str]:
    """The Debian mirrors this machine's apt uses for `suite` (maybe none)."""
    sources = [Path("/etc/apt/sources.list"),
               *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
               *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    return parse_mirrors([p.read_text() for p in sources if p.is_file()], suite)


def host_mirror(suite: str = "bookworm") -> str:
    """The Debian mirror this machine's apt already uses for `suite` (nothing hard-coded)."""
    mirrors = host_mirrors(suite)
    if not mirrors:
        raise ImageBuildError(f"no Debian mirror for {suite} main in /etc/apt/sources.list(.d)",
                              hint=f"add a 'deb <mirror> {suite} main' line")
    return mirrors[0]
