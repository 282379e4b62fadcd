"""A cache of tensor digests so that a restart does not rehash unchanged checkpoint files.

Entries are keyed by the file's absolute path, size and ``mtime_ns``: change any of
them and every digest of that file is recomputed. The cache lives in
``.teeshard-manifest-cache.json`` next to the checkpoint when that directory is
writable, else under ``$XDG_CACHE_HOME/teeshard`` (``~/.cache/teeshard``).

Trust: a cache hit trusts that the file did not change while keeping its size and
mtime. Whoever can write the checkpoint directory can break that (``touch -d``), so
inside a TEE use the cache only where the storage itself is protected (dstack's
encrypted app volume, Gramine trusted or encrypted files); on storage the host
controls, pass ``cache=None`` and hash at every load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_NAME = ".teeshard-manifest-cache.json"
_VERSION = 1


class ManifestCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._load()

    @classmethod
    def for_checkpoint(cls, model_dir: str | Path) -> ManifestCache:
        """The default cache for a checkpoint directory (see the module docstring)."""
        model_dir = Path(model_dir).resolve()
        if os.access(model_dir, os.W_OK):
            return cls(model_dir / CACHE_NAME)
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "teeshard"
        tag = hashlib.sha256(str(model_dir).encode()).hexdigest()[:16]
        return cls(base / f"manifest-{tag}.json")

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable manifest cache %s: %s", self.path, exc)
            return
        if isinstance(data, dict) and data.get("version") == _VERSION:
            files = data.get("files")
            if isinstance(files, dict):
                self._files = files

    @staticmethod
    def _stamp(file: Path) -> tuple[str, int, int]:
        stat = file.stat()
        return str(file.resolve()), stat.st_size, stat.st_mtime_ns

    def lookup(self, file: Path, key: str) -> bytes | None:
        """The cached digest of ``key`` in ``file``, if the file is unchanged."""
        name, size, mtime_ns = self._stamp(file)
        entry = self._files.get(name)
        if not entry or entry.get("size") != size or entry.get("mtime_ns") != mtime_ns:
            return None
        digest = entry.get("tensors", {}).get(key)
        try:
            return bytes.fromhex(digest) if isinstance(digest, str) and len(digest) == 64 else None
        except ValueError:
            return None

    def store(self, file: Path, key: str, digest: bytes) -> None:
        name, size, mtime_ns = self._stamp(file)
        entry = self._files.get(name)
        if not entry or entry.get("size") != size or entry.get("mtime_ns") != mtime_ns:
            entry = {"size": size, "mtime_ns": mtime_ns, "tensors": {}}
            self._files[name] = entry
        if entry["tensors"].get(key) != digest.hex():
            entry["tensors"][key] = digest.hex()
            self._dirty = True

    def save(self) -> None:
        """Write the cache atomically; a failure to write only costs a rehash later."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".manifest-cache-")
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": _VERSION, "files": self._files}, handle)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as exc:
            log.warning("could not write manifest cache %s: %s", self.path, exc)
