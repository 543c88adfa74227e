"""The MLflow SQLite store's journal: write-ahead (WAL) while a command records runs on a local disk.

In SQLite's default rollback journal every commit syncs the journal, the database and, when
it makes the journal anew, the folder: a few milliseconds of waiting each, and a trial's run
takes five commits to open and record. In write-ahead mode with ``synchronous=NORMAL`` a
commit appends to ``<store>-wal`` and waits on no sync; the log is synced when SQLite folds it
into the database (a checkpoint). SQLite's documentation states what that costs: the database
stays consistent through a crash or a power loss, and a power loss can undo the commits made
since the last checkpoint. A process killed outright loses nothing.

Commands that record runs open the store so: :func:`begin` (from
:func:`pipeline.tracking.prepare_store`) starts the write-ahead period and :func:`close` ends
it; ``export``, which writes no rows, leaves the file as it finds it. The mode needs memory shared
by every process that opens the database, which a network file system does not give
(SQLite's documentation: WAL "does not work over a network filesystem"). So the store is
switched only when Linux's mount table says the folder of its file (a link followed, as SQLite
follows it) is on a local file system (:data:`LOCAL_FILESYSTEMS`); anywhere else, or where the
table cannot be read, the journal stays as it is. Every engine that reaches a switched
database in this process, MLflow's model registry's too, is closed by :func:`close` when a
command's stage ends (and at exit), which folds the log into the database and, when no other
process has it open, switches the file back to the rollback journal: between commands
``mlflow.db`` is a plain SQLite file, with no ``-wal`` or ``-shm`` beside it, that any SQLite
reads, on any file system and in a read-only folder. What the process does with MLflow after
that (a notebook, a test) finds plain SQLite stores, until a command begins again.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sqlite3
from pathlib import Path, PurePosixPath

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

MOUNT_TABLE = Path("/proc/self/mountinfo")
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "jfs", "reiserfs",
                               "bcachefs", "nilfs2", "tmpfs", "ramfs", "overlay"})

_DATABASES: set[Path] = set()  # the files switched in this period (links followed), for close()
_ENGINES: list[Engine] = []  # every engine of this process with connections to them
_in_period = False  # from begin() to close()


def begin() -> None:
    """Start a write-ahead period: SQLite stores that :func:`use_wal` is given from now until
    :func:`close` write ahead."""
    if not event.contains(Engine, "engine_connect", _adopt_if_switched):
        event.listen(Engine, "engine_connect", _adopt_if_switched)
        atexit.register(close)
    global _in_period
    _in_period = True


def use_wal(engine: Engine, database: Path) -> None:
    """In a write-ahead period, open the connections of ``engine`` (MLflow's, to the SQLite file
    ``database``), and of any other engine that reaches the file later, in write-ahead mode
    with ``synchronous=NORMAL`` when the file is on a local file system; :func:`close` closes
    them. Outside one, nothing."""
    database = database.resolve()
    if not _in_period or database in _DATABASES or not on_local_disk(database.parent):
        return
    _DATABASES.add(database)
    _adopt(engine)
    engine.dispose()  # the connections MLflow opened to check the tables reopen in the mode


def _adopt_if_switched(connection: Connection) -> None:
    """Adopt an engine that reaches a switched database (MLflow's model registry keeps an
    engine of its own) as it first hands out a connection."""
    engine = connection.engine
    if engine not in _ENGINES and engine.dialect.name == "sqlite" and engine.url.database and \
            Path(engine.url.database).resolve() in _DATABASES:
        _adopt(engine)


def _adopt(engine: Engine) -> None:
    event.listen(engine, "connect", _write_ahead)
    _ENGINES.append(engine)


def close() -> None:
    """End the write-ahead period: close every connection of this process to the switched
    databases, fold each one's log into it and, where no other process has it open, switch it
    back to the rollback journal (which removes ``-wal`` and ``-shm``). A command calls it when
    its stage ends; an engine used again opens plain connections."""
    for engine in _ENGINES:
        event.remove(engine, "connect", _write_ahead)
        engine.dispose()
    for database in _DATABASES:  # gone, or open elsewhere (which folds it when it closes): left
        with contextlib.suppress(sqlite3.Error), contextlib.closing(
                sqlite3.connect(f"{database.as_uri()}?mode=rw", uri=True, timeout=0)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            connection.execute("PRAGMA journal_mode=DELETE")
    _ENGINES.clear()
    _DATABASES.clear()
    global _in_period
    _in_period = False


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
        table = MOUNT_TABLE.read_bytes().decode("utf-8", "surrogateescape")
        folder = folder.resolve()
        device = folder.stat().st_dev
    except OSError:
        return False
    return filesystem_of(folder, table, (os.major(device), os.minor(device))) in LOCAL_FILESYSTEMS


def filesystem_of(path: Path, mount_table: str, device: tuple[int, int] | None = None) -> str | None:
    """The type of the file system that holds absolute ``path``, from the text of a Linux
    ``mountinfo`` table: the mount point closest to ``path`` (the last mount of a point wins, as
    it hides the ones before) among the mounts of ``device`` (``path``'s ``st_dev`` as major and
    minor), which tells a mount hidden under a later mount of its parent from the one that
    holds the path; among all mounts when none of ``device`` is on the way (btrfs subvolumes
    report other numbers than their mount). None if no mount holds it."""
    best, found = (False, -1), None
    target = PurePosixPath(path)
    for line in mount_table.splitlines():
        fields, _, after = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not after:
            continue
        point = PurePosixPath(_unescape(parts[4]))
        rank = (device is not None and parts[2] == f"{device[0]}:{device[1]}", len(point.parts))
        if rank >= best and (target == point or point in target.parents):
            best, found = rank, after.split()[0]
    return found


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (``\\040`` for a space) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
