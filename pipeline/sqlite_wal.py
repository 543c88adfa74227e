"""The MLflow SQLite store's journal: write-ahead (WAL) when the store is on a local disk.

In SQLite's default rollback journal every commit syncs the journal, the database and, when
it makes the journal anew, the folder: a few milliseconds of waiting each, and a trial's run
takes five commits to open and record. In write-ahead mode with ``synchronous=NORMAL`` a
commit appends to ``<store>-wal`` and waits on no sync; the log is synced when SQLite folds it
into the database (a checkpoint). SQLite's documentation states what that costs: the database
stays consistent through a crash or a power loss, and a power loss can undo the commits made
since the last checkpoint. A process killed outright loses nothing.

Commands that record runs open the store so (:func:`pipeline.tracking.prepare_store`);
``export``, which only reads them, leaves the file as it finds it. The mode needs memory
shared by every process that opens the database, which a network file system does not give
(SQLite's documentation: WAL "does not work over a network filesystem"). So the store is
switched only when Linux's mount table says its folder is on a local file system
(:data:`LOCAL_FILESYSTEMS`); anywhere else, or where the table cannot be read, the journal
stays as it is. The mode is a property of the database file: it stays after the command, and
any SQLite, MLflow's UI included, opens the file as it is. A command closes its store's
connections when its stage ends (:func:`close`; any process at exit), and the last
connection to close folds the log into the database and removes ``-wal`` and ``-shm``.
"""

from __future__ import annotations

import atexit
import sqlite3
from pathlib import Path, PurePosixPath

from sqlalchemy import event
from sqlalchemy.engine import Engine

MOUNT_TABLE = Path("/proc/self/mountinfo")
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs",
                               "bcachefs", "nilfs2", "tmpfs", "ramfs", "overlay"})


_ENGINES: list[Engine] = []  # the engines switched here, for close()


def use_wal(engine: Engine, database: Path) -> None:
    """Open the connections of ``engine`` (MLflow's, to the SQLite file ``database``) in
    write-ahead mode with ``synchronous=NORMAL`` when the file's folder is on a local file
    system; their pool is closed by :func:`close`, at the latest when the process exits."""
    if engine in _ENGINES or not on_local_disk(database.parent):
        return
    event.listen(engine, "connect", _write_ahead)
    engine.dispose()  # the connections MLflow opened to check the tables reopen in the mode
    if not _ENGINES:
        atexit.register(close)
    _ENGINES.append(engine)


def close() -> None:
    """Close the pooled connections of the engines switched to write-ahead mode, so that the
    last connection to each database folds its log in and removes ``-wal`` and ``-shm`` (a
    command calls it when its stage ends; an engine used again opens new connections)."""
    for engine in _ENGINES:
        engine.dispose()


def _write_ahead(connection: sqlite3.Connection, _record) -> None:
    """Switch a new connection's database to WAL and its commits to ``synchronous=NORMAL``.
    A database SQLite cannot switch (read-only, or held by another process's transaction
    past the busy timeout) keeps its journal, and its commits their full syncs."""
    cursor = connection.cursor()
    try:
        if cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError:
        pass
    finally:
        cursor.close()


def on_local_disk(folder: Path) -> bool:
    """Whether ``folder`` is on a file system of :data:`LOCAL_FILESYSTEMS` (False when the mount
    table cannot be read: not Linux)."""
    try:
        table = MOUNT_TABLE.read_text()
    except OSError:
        return False
    return filesystem_of(folder.resolve(), table) in LOCAL_FILESYSTEMS


def filesystem_of(path: Path, mount_table: str) -> str | None:
    """The type of the file system that holds absolute ``path``, from the text of a Linux
    ``mountinfo`` table (the mount point closest to ``path``; the last mount of a point wins,
    as it hides the ones before); None if no mount holds it."""
    best, found = -1, None
    target = PurePosixPath(path)
    for line in mount_table.splitlines():
        fields, _, after = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not after:
            continue
        point = PurePosixPath(_unescape(parts[4]))
        depth = len(point.parts)
        if depth >= best and (target == point or point in target.parents):
            best, found = depth, after.split()[0]
    return found


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (``\\040`` for a space) decoded."""
    return field.encode().decode("unicode_escape") if "\\" in field else field
