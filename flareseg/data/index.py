"""The LMDB case index of a prepared folder: one JSON record per prepared case, and the folder's metadata.

Case records and metadata live in two named databases of one environment, so no case id (not even "__meta__")
can ever be read as metadata or overwrite it. Each record is written in its own transaction, after the case's
arrays are on disk, so the index never holds a half-written record and never points at a missing array. Readers
open the environment lazily in each process, read-only and without locks, which is what DataLoader workers need.

This module owns the index's layout: its folder name, its format number and the metadata names are spelled here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

INDEX_DIR = "index.lmdb"  # the index folder inside a prepared folder
# 4: records hold named stage grids ("grids"); 3: records and metadata in separate named databases (2: one key
# space, "__meta__")
INDEX_FORMAT = 4

# Metadata names (the metadata database; never case ids).
META_FORMAT = "format"  # int: the INDEX_FORMAT the index was written in
META_VERSION = "flareseg"  # str: the flareseg version that prepared the folder
META_SETTINGS = "settings"  # dict: the prepare settings every array was made with (a mixed index is refused)
META_SPLITS = "splits"  # {"folds", "seed", "splits": [{"train": [...], "val": [...]}, ...]} over the labeled cases
META_NAMES = (META_FORMAT, META_VERSION, META_SETTINGS, META_SPLITS)

_CASES_DB = b"cases"
_META_DB = b"meta"
_MAP_SIZE = 1 << 30  # grown on demand


class IndexFormatError(ValueError):
    """An index this version cannot use (an older or newer format); the message says what to do."""


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _check_meta_name(name: str) -> bytes:
    if name not in META_NAMES:
        raise KeyError(f"'{name}' is not an index metadata name (one of {', '.join(META_NAMES)})")
    return name.encode()


def _open_databases(env: lmdb.Environment, path: Path, create: bool) -> tuple[Any, Any]:
    """The (cases, metadata) database handles of an index of this format; IndexFormatError for any other.

    Handles are opened outside the caller's transactions: LMDB keeps a handle only once its transaction commits.
    """
    with env.begin() as txn:
        names = set(txn.cursor().iternext(keys=True, values=False))
        old_meta = txn.get(b"__meta__")  # formats 1 and 2: cases and "__meta__" shared the main key space
    if not names and create:  # a new index: both databases and the format in one transaction
        with env.begin(write=True) as txn:
            cases, meta = env.open_db(_CASES_DB, txn=txn), env.open_db(_META_DB, txn=txn)
            txn.put(META_FORMAT.encode(), _encode(INDEX_FORMAT), db=meta)
        return cases, meta
    found = None
    if names == {_CASES_DB, _META_DB}:
        cases, meta = env.open_db(_CASES_DB, create=False), env.open_db(_META_DB, create=False)
        with env.begin() as txn:
            data = txn.get(META_FORMAT.encode(), db=meta)
        found = None if data is None else json.loads(data)
        if found == INDEX_FORMAT:
            return cases, meta
    elif old_meta is not None:
        found = json.loads(old_meta).get("format", 1)
    if found is None:
        raise IndexFormatError(f"{path} is not a complete flareseg case index; run `flareseg prepare` with --overwrite")
    age = "an older" if isinstance(found, int) and found < INDEX_FORMAT else "another"
    raise IndexFormatError(
        f"{path} was written by {age} flareseg (index format {found}; this version reads format {INDEX_FORMAT}): "
        "prepare this folder again with `flareseg prepare ... --overwrite` (or into a new --out folder)"
    )


class IndexWriter:
    """The single writer of an index (the preparing process, holding the prepared folder's lock)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        close_reader(self.path)  # a writer in this process replaces any read-only handle
        self._env = lmdb.open(str(self.path), map_size=_MAP_SIZE, subdir=True, max_dbs=2)
        try:
            self._cases, self._meta = _open_databases(self._env, self.path, create=True)
        except BaseException:
            self._env.close()
            raise

    def _write(self, key: bytes, data: bytes | None, db: Any) -> None:
        """Put (or delete, for None) one key in its own transaction, growing the map when it is full."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    if data is None:
                        txn.delete(key, db=db)
                    else:
                        txn.put(key, data, db=db)
                return
            except lmdb.MapFullError:
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def _read(self, key: bytes, db: Any) -> Any | None:
        with self._env.begin() as txn:
            data = txn.get(key, db=db)
        return None if data is None else json.loads(data)

    def put(self, case_id: str, record: dict) -> None:
        """Store one case record atomically."""
        self._write(case_id.encode(), _encode(record), self._cases)

    def delete(self, case_id: str) -> None:
        self._write(case_id.encode(), None, self._cases)

    def get(self, case_id: str) -> dict | None:
        """A case record, or None."""
        return self._read(case_id.encode(), self._cases)

    def case_ids(self) -> list[str]:
        """Every case id, sorted (LMDB keeps keys in byte order)."""
        with self._env.begin() as txn:
            return [key.decode() for key in txn.cursor(db=self._cases).iternext(keys=True, values=False)]

    def put_meta(self, name: str, value: Any) -> None:
        """Store one metadata value (`name` is one of META_NAMES)."""
        self._write(_check_meta_name(name), _encode(value), self._meta)

    def delete_meta(self, name: str) -> None:
        self._write(_check_meta_name(name), None, self._meta)

    def meta(self, name: str, default: Any = None) -> Any:
        value = self._read(_check_meta_name(name), self._meta)
        return default if value is None else value

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# One read-only environment per index and process: LMDB allows a path to be opened once per process, and
# every CaseIndex on the same index (train and validation datasets, say) shares it.
class _Reader(NamedTuple):
    pid: int  # the process that opened it: a handle inherited through fork must not be used
    env: lmdb.Environment
    cases: Any  # database handles
    meta: Any


_READERS: dict[str, _Reader] = {}


def _reader(path: Path) -> _Reader:
    """This process's read-only handles on an index, opened on first use."""
    key = str(path.resolve())
    cached = _READERS.get(key)
    if cached is not None and cached.pid == os.getpid():
        return cached
    if cached is not None:
        # Inherited through fork (a DataLoader worker): the handle must not be used here. Closing it only
        # unmaps this process's view; read-only and without locks, nothing is shared to release.
        cached.env.close()
        del _READERS[key]
    env = lmdb.open(
        key, readonly=True, lock=False, readahead=False, meminit=False, subdir=True, max_readers=512, max_dbs=2
    )
    try:
        cases, meta = _open_databases(env, path, create=False)
    except BaseException:
        env.close()
        raise
    _READERS[key] = _Reader(os.getpid(), env, cases, meta)
    return _READERS[key]


def close_reader(path: str | os.PathLike) -> None:
    """Close this process's read-only handle on an index (the next read reopens it)."""
    cached = _READERS.pop(str(Path(path).resolve()), None)
    if cached is not None and cached.pid == os.getpid():
        cached.env.close()


class CaseIndex:
    """Read-only view of an index, safe to pickle into DataLoader workers (each process opens its own handle).

    `get(case_id)` reads case records, `meta(name)` the folder's metadata (META_SETTINGS, META_SPLITS, ...).
    An index of another format raises IndexFormatError on first use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise FileNotFoundError(f"no case index at {self.path}; run `flareseg prepare` first")

    @property
    def root(self) -> Path:
        """The prepared-data folder; array paths in records are relative to it."""
        return self.path.parent

    def _read(self, key: bytes, meta: bool = False) -> bytes | None:
        reader = _reader(self.path)
        with reader.env.begin(buffers=False) as txn:
            return txn.get(key, db=reader.meta if meta else reader.cases)

    def get(self, case_id: str) -> dict:
        """The record of a case; KeyError naming the index if absent."""
        data = self._read(case_id.encode())
        if data is None:
            raise KeyError(f"case '{case_id}' is not in the index {self.path}")
        return json.loads(data)

    def meta(self, name: str, default: Any = None) -> Any:
        """One metadata value (`name` is one of META_NAMES), or `default` when the index holds none."""
        data = self._read(_check_meta_name(name), meta=True)
        return default if data is None else json.loads(data)

    def case_ids(self) -> list[str]:
        """Every case id, sorted."""
        reader = _reader(self.path)
        with reader.env.begin() as txn:
            return [key.decode() for key in txn.cursor(db=reader.cases).iternext(keys=True, values=False)]

    def __contains__(self, case_id: str) -> bool:
        return self._read(case_id.encode()) is not None

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
