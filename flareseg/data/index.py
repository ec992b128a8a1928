"""The LMDB case index: key = case id (utf-8), value = one JSON record per prepared case.

Each record is written in its own transaction, after the case's arrays are on disk, so the index never
holds a half-written record and never points at a missing array. Readers open the environment lazily in each
process, read-only and without locks, which is what DataLoader workers need.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

META_PREFIX = "__"  # keys such as "__meta__" and "__splits__" are not cases
_MAP_SIZE = 1 << 30  # grown on demand


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _case_keys(txn: lmdb.Transaction) -> list[str]:
    """Every case id in the index, sorted (LMDB keeps keys in byte order), without the meta keys."""
    keys = (key.decode() for key in txn.cursor().iternext(keys=True, values=False))
    return [key for key in keys if not key.startswith(META_PREFIX)]


class IndexWriter:
    """The single writer of an index (the preparing process)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        close_reader(self.path)  # a writer in this process replaces any read-only handle
        self._env = lmdb.open(str(self.path), map_size=_MAP_SIZE, subdir=True, max_dbs=0)

    def put(self, key: str, value: Any) -> None:
        """Store one record atomically (grows the map when full)."""
        data = _encode(value)
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    txn.put(key.encode(), data)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def delete(self, key: str) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(key.encode())

    def clear(self) -> None:
        """Remove every record (used by an overwriting run)."""
        with self._env.begin(write=True) as txn:
            txn.drop(self._env.open_db(), delete=False)

    def get(self, key: str) -> Any | None:
        with self._env.begin() as txn:
            data = txn.get(key.encode())
        return None if data is None else json.loads(data)

    def case_ids(self) -> list[str]:
        with self._env.begin() as txn:
            return _case_keys(txn)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# One read-only environment per index and process: LMDB allows a path to be opened once per process, and
# every CaseIndex on the same index (train and validation datasets, say) shares it.
_READERS: dict[str, tuple[int, lmdb.Environment]] = {}


def _reader(path: Path) -> lmdb.Environment:
    key = str(path.resolve())
    cached = _READERS.get(key)
    if cached is not None and cached[0] == os.getpid():
        return cached[1]
    if cached is not None:
        # Inherited through fork (a DataLoader worker): the handle must not be used here. Closing it only
        # unmaps this process's view; read-only and without locks, nothing is shared to release.
        cached[1].close()
    env = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, subdir=True, max_readers=512)
    _READERS[key] = (os.getpid(), env)
    return env


def close_reader(path: str | os.PathLike) -> None:
    """Close this process's read-only handle on an index (the next read reopens it)."""
    cached = _READERS.pop(str(Path(path).resolve()), None)
    if cached is not None and cached[0] == os.getpid():
        cached[1].close()


class CaseIndex:
    """Read-only view of an index, safe to pickle into DataLoader workers (each process opens its own handle)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"no case index at {self.path}; run `flareseg prepare` first")

    @property
    def root(self) -> Path:
        """The prepared-data folder; array paths in records are relative to it."""
        return self.path.parent

    def _txn(self) -> lmdb.Transaction:
        return _reader(self.path).begin(buffers=False)

    def get(self, key: str) -> Any:
        """The record of a case (or a "__meta__"-style key); KeyError naming the index if absent."""
        with self._txn() as txn:
            data = txn.get(key.encode())
        if data is None:
            raise KeyError(f"'{key}' is not in the index {self.path}")
        return json.loads(data)

    def meta(self, key: str, default: Any = None) -> Any:
        try:
            return self.get(key)
        except KeyError:
            return default

    def case_ids(self) -> list[str]:
        with self._txn() as txn:
            return _case_keys(txn)

    def __contains__(self, key: str) -> bool:
        with self._txn() as txn:
            return txn.get(key.encode()) is not None

    def __len__(self) -> int:
        return len(self.case_ids())

    def __iter__(self) -> Iterator[str]:
        return iter(self.case_ids())

    def array_path(self, record: dict, name: str) -> Path:
        """Absolute path of one of a record's arrays ("coarse_image", "fine_label", ...)."""
        return self.root / record["arrays"][name]

    def close(self) -> None:
        """Release this process's handle; the next read opens a new one."""
        close_reader(self.path)
