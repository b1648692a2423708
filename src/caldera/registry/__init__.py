"""The model registry: published models on a shared filesystem, found by ``NAME@VERSION`` (no server, no database).

Layout (docs/registry.md), readable from C with directory calls only::

    REGISTRY/NAME/v3/            one immutable version: its files, and MANIFEST (sha256sum format) written last
    REGISTRY/NAME/tags/TAG       a text file holding a version number ("3"), replaced by an atomic rename
    REGISTRY/.staging/...        hidden: versions being written (a killed publisher's are removed when stale)
    REGISTRY/.trash/...          hidden: what a cleanup is deleting

A version number is taken with ``mkdir`` of ``vN`` (atomic on local filesystems, NFS and Lustre; no fcntl lock);
the staged version is then renamed over that empty directory, so a version is visible (holds a MANIFEST) whole or
not at all. A removed version keeps its directory with only ``REMOVED`` in it, so its number is never reused.
This module is the resolver ``caldera predict``, ``serve`` and ``Surrogate.from_run`` share; it imports only the
ground floor. Publishing (which runs ``caldera export``) is ``caldera.registry.publish``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caldera.errors import ConfigError
from caldera.io import atomic_write_text, sha256_file

ENV = "CALDERA_REGISTRY"
MANIFEST = "MANIFEST"  # "<sha256>  <file>" per line: `sha256sum -c MANIFEST` checks a version by hand
REMOVED = "REMOVED"  # what a removed version's directory keeps (its old manifest)
PROVENANCE = "provenance.json"
STAGING, TRASH, TAGS = ".staging", ".trash", "tags"
LATEST = "latest"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
TAG_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
VERSION_RE = re.compile(r"v([0-9]+)")
FIX = f"export {ENV}=/shared/models (caldera publish and caldera models also take --registry DIR)"


def is_ref(text: str | os.PathLike) -> bool:
    """Whether ``text`` reads as ``NAME@VERSION`` (and is not an existing path)."""
    s = os.fspath(text)
    return "@" in s and not Path(s).exists() and "/" not in s.rsplit("@", 1)[0]


def resolve(ref: str | os.PathLike, registry: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """A run directory as given, or the directory of the published version ``NAME@VERSION`` (hashes checked)."""
    if not is_ref(ref):
        return Path(ref)
    return Registry.find(registry, for_ref=os.fspath(ref)).get(os.fspath(ref), verify=verify).path


def check_name(name: str) -> str:
    """``name`` if it can name a model, else a ConfigError with the rule."""
    if not NAME_RE.fullmatch(name) or name.endswith((".", "-")):
        raise ConfigError(f"model name {name!r}: use letters, digits, '_', '.', '-' (starting with a letter or "
                          "digit), e.g. --name heat-surrogate")  # fmt: skip
    return name


def check_tag(tag: str) -> str:
    """``tag`` if it can be a tag (not 'latest', not a version number), else a ConfigError."""
    if tag == LATEST or not TAG_RE.fullmatch(tag) or VERSION_RE.fullmatch(tag):
        raise ConfigError(f"tag {tag!r}: use a name starting with a letter (letters, digits, '_', '.', '-'), not "
                          "'latest' nor a version like v3, e.g. --tag prod")  # fmt: skip
    return tag


def write_manifest(folder: Path) -> str:
    """Hash every file under ``folder`` into its MANIFEST (written atomically, last); return the version's content
    hash (the sha256 of the MANIFEST)."""
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}" for p in sorted(_files(folder))]
    text = "".join(line + "\n" for line in lines)
    atomic_write_text(folder / MANIFEST, text)
    return hashlib.sha256(text.encode()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]


@dataclass
class Version:
    """One published version: its name, number, directory and the tags pointing at it."""

    name: str
    number: int
    path: Path
    tags: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """``NAME@N``."""
        return f"{self.name}@{self.number}"

    @property
    def content_hash(self) -> str:
        """The sha256 of the MANIFEST: one hash for every byte of the version."""
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()

    def manifest(self) -> dict[str, str]:
        """file -> sha256, as published."""
        out = {}
        for line in (self.path / MANIFEST).read_text().splitlines():
            digest, _, name = line.partition("  ")
            out[name] = digest
        return out

    def verify(self) -> None:
        """Refuse (ConfigError, one line naming the file) a version whose files differ from its manifest."""
        listed = self.manifest()
        for name, digest in listed.items():
            path = self.path / name
            if not path.is_file():
                raise ConfigError(f"{self.ref}: {name} is missing from {self.path} (listed in its MANIFEST): the "
                                  "published files were changed; publish the run again")  # fmt: skip
            if sha256_file(path) != digest:
                raise ConfigError(f"{self.ref}: {name} does not match its MANIFEST (sha256 differs): the published "
                                  "files were changed; publish the run again")  # fmt: skip
        extra = sorted(p.relative_to(self.path).as_posix() for p in _files(self.path))
        extra = [e for e in extra if e not in listed]
        if extra:
            raise ConfigError(f"{self.ref}: {extra[0]} in {self.path} is not in its MANIFEST: the published files "
                              "were changed; publish the run again")  # fmt: skip

    def json(self, name: str) -> dict[str, Any]:
        """A JSON file of the version ({} when absent)."""
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return {}


class Registry:
    """A registry directory on a shared filesystem."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @classmethod
    def find(cls, registry: str | os.PathLike | None = None, for_ref: str | None = None,
             create: bool = False) -> Registry:  # fmt: skip
        """``registry``, else $CALDERA_REGISTRY; a ConfigError with the fix when neither is given or it is absent."""
        root = registry or os.environ.get(ENV)
        what = f"{for_ref} names a registry model but no" if for_ref else "no"
        if not root:
            raise ConfigError(f"{what} registry is given: {FIX}")
        path = Path(root)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.is_dir():
            raise ConfigError(f"registry {path} does not exist: publish a model there first (caldera publish "
                              f"RUN_DIR --registry {path}) or fix {ENV}/--registry")  # fmt: skip
        return cls(path)

    # -- reading -------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The model names with at least one visible version."""
        out = []
        for p in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if p.is_dir() and not p.name.startswith(".") and self.versions(p.name):
                out.append(p.name)
        return out

    def numbers(self, name: str) -> list[int]:
        """Every number taken under ``name`` (visible, removed or claimed by a publisher), ascending."""
        folder = self.root / name
        found = []
        for entry in os.listdir(folder) if folder.is_dir() else ():
            m = VERSION_RE.fullmatch(entry)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def versions(self, name: str) -> list[Version]:
        """The visible (complete, not removed) versions of ``name``, ascending, with their tags."""
        tags = self.tags(name)
        out = []
        for n in self.numbers(name):
            path = self.root / name / f"v{n}"
            if (path / MANIFEST).is_file():
                out.append(Version(name, n, path, tuple(sorted(t for t, v in tags.items() if v == n))))
        return out

    def tags(self, name: str) -> dict[str, int]:
        """tag -> version number (a tag file that does not hold a number is skipped)."""
        folder = self.root / name / TAGS
        out = {}
        for p in sorted(folder.iterdir()) if folder.is_dir() else ():
            if p.name.startswith("."):
                continue
            text = p.read_text().strip()
            if text.isdigit():
                out[p.name] = int(text)
        return out

    def get(self, ref: str, verify: bool = True) -> Version:
        """The version ``NAME@N``, ``NAME@vN``, ``NAME@latest``, ``NAME@TAG`` or ``NAME`` (latest); checked against its
        manifest unless ``verify`` is False. Unknown names and versions are one-line ConfigErrors."""
        name, _, which = ref.rpartition("@") if "@" in ref else (ref, "", LATEST)
        which = which or LATEST
        versions = self.versions(name) if (self.root / name).is_dir() else []
        if not versions:
            known = ", ".join(self.names()) or "none yet"
            raise ConfigError(f"no model {name!r} in registry {self.root} (it has: {known}); `caldera models list` "
                              "shows them")  # fmt: skip
        tags = self.tags(name)
        number: int | None
        if which == LATEST:
            number = versions[-1].number
        elif which.isdigit() or VERSION_RE.fullmatch(which):
            number = int(which.lstrip("v"))
        elif which in tags:
            number = tags[which]
        else:
            number = None
        found = next((v for v in versions if v.number == number), None)
        if found is None:
            have = ", ".join(str(v.number) for v in versions)
            tagged = ", ".join(f"{t}->{n}" for t, n in tags.items()) or "none"
            removed = " (it was removed)" if number is not None and (self.root / name / f"v{number}" / REMOVED).exists()\
                else ""  # fmt: skip
            raise ConfigError(f"{name} has no version {which!r}{removed}: versions {have}; tags {tagged}; "
                              f"e.g. {name}@latest")  # fmt: skip
        if verify:
            found.verify()
        return found

    # -- writing -------------------------------------------------------------------------------------------------
    def staging(self, name: str) -> Path:
        """A new hidden staging directory for a version of ``name`` (host and pid in its name, for cleanup)."""
        folder = self.root / STAGING
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}@{_host()}@{os.getpid()}@{secrets.token_hex(4)}"
        path.mkdir()
        return path

    def commit(self, name: str, staged: Path) -> Version:
        """Give the staged version the next free number of ``name``: claim ``vN`` with mkdir (fails if taken: try
        N+1), then rename the staged directory over the empty claim (atomic: the version appears whole)."""
        folder = self.root / check_name(name)
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(10000):
            taken = self.numbers(name)
            number = (taken[-1] if taken else 0) + 1
            target = folder / f"v{number}"
            try:
                os.mkdir(target)
            except FileExistsError:
                continue  # another publisher took it between our listing and mkdir: list again
            try:
                os.rename(staged, target)
            except OSError:
                continue  # the claim was filled meanwhile (a stale-claim cleanup raced us): next number
            _read_only(target)
            return Version(name, number, target)
        raise ConfigError(f"could not take a version number under {folder}: check that it is writable")

    def tag(self, name: str, tag: str, number: int) -> None:
        """Point ``tag`` at version ``number`` (an atomic rename: readers see the old or the new number)."""
        atomic_write_text(self.root / name / TAGS / check_tag(tag), f"{number}\n")

    def remove(self, ref: str) -> tuple[Version, list[str]]:
        """Remove a version: its MANIFEST is renamed to REMOVED first (invisible at once, whole), then the other
        files are deleted; tags pointing at it are removed. Returns the version and the removed tags."""
        version = self.get(ref, verify=False)
        os.chmod(version.path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        os.rename(version.path / MANIFEST, version.path / REMOVED)
        for entry in version.path.iterdir():
            if entry.name != REMOVED:
                _delete(entry)
        removed = []
        for tag, number in self.tags(version.name).items():
            if number == version.number:
                (self.root / version.name / TAGS / tag).unlink(missing_ok=True)
                removed.append(tag)
        return version, removed

    def clean_stale(self, max_age_s: float = 6 * 3600) -> list[str]:
        """Remove staging directories of publishers that died: on this host, whose process is gone; elsewhere,
        untouched for ``max_age_s``. Each is renamed into .trash first (one cleaner wins), then deleted."""
        folder, trash = self.root / STAGING, self.root / TRASH
        cleaned = []
        for entry in list(folder.iterdir()) if folder.is_dir() else ():
            parts = entry.name.split("@")
            if len(parts) != 4:
                continue
            _, host, pid, _ = parts
            try:
                age = time.time() - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            dead = host == _host() and pid.isdigit() and not _alive(int(pid))
            if not (dead or age > max_age_s):
                continue
            trash.mkdir(exist_ok=True)
            try:
                os.rename(entry, trash / entry.name)
            except OSError:
                continue  # another cleaner took it
            cleaned.append(entry.name)
        for entry in list(trash.iterdir()) if trash.is_dir() else ():
            shutil.rmtree(entry, onerror=_writable_then_retry)
        # An interrupted `models rm`: the version is already invisible (REMOVED, no MANIFEST); finish deleting.
        for removed in self.root.glob(f"*/v*/{REMOVED}"):
            for entry in removed.parent.iterdir():
                if entry.name != REMOVED:
                    _delete(entry)
        return cleaned


def _read_only(path: Path) -> None:
    """Files 0444 and directories 0555: a published version is not changed in place by accident."""
    for p in sorted(path.rglob("*"), reverse=True):
        if p.is_file():
            p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        elif p.is_dir():
            p.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def _delete(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, onerror=_writable_then_retry)
    else:
        entry.unlink(missing_ok=True)


def _writable_then_retry(func: Any, path: str, _exc: Any) -> None:
    """shutil.rmtree's error hook: a read-only directory (a published version's) is made writable, then retried."""
    parent = os.path.dirname(path)
    if os.path.isdir(parent):
        os.chmod(parent, stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, stat.S_IRWXU)
    with contextlib.suppress(FileNotFoundError):  # another cleaner got there first
        func(path)


def _host() -> str:
    return os.uname().nodename.replace("@", "_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
