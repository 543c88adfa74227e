"""Places the project reads and writes, checked before anything is written.

Every file a command reads goes through :func:`existing_file`, and every output folder,
features file, Optuna journal or SQLite file and the MLflow store's own file through
:func:`writable_file` or :func:`writable_dir` first. A missing folder is
made; a file where a folder belongs (or the reverse), a folder that refuses new files (no
permission, an immutable folder, a read-only filesystem) is a :class:`UserError` that names
the path and the problem, raised before any run, study or file exists.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pipeline.errors import UserError

NOT_REGULAR = "not a regular file (a device, a pipe or a socket)"


def writable_dir(path: str | os.PathLike, what: str, make: bool = True) -> Path:
    """``path`` as a folder that takes new files, made (with its parents) if missing; with
    ``make`` false, only checked: a command that writes there later leaves no empty folder if
    it stops first.

    ``what`` says what the path is for (``output``, ``storage``, ``MLflow store``); it starts the
    error message: ``output exports: is a file, not a folder``.
    """
    path = Path(path)
    _ready_folder(path, f"{what} {path}", own=True, make=make)
    return path


def existing_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a file to read, or :class:`UserError`: ``<what> not found: <path>``, or
    ``<what> <path>: is a folder, not a file``."""
    path = Path(path)
    refuse_other_than_file(path, f"{what} {path}")
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    return path


def refuse_other_than_file(path: Path, named: str) -> None:
    """Raise :class:`UserError` starting with ``named`` when something other than a regular file
    is at ``path``: a folder, a device, a pipe or a socket."""
    if path.is_dir():
        raise UserError(f"{named}: is a folder, not a file")
    if path.exists() and not path.is_file():
        raise UserError(f"{named}: {NOT_REGULAR}")


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a file that can be written (created, replaced or appended to): not a folder,
    writable if it exists, in a folder that takes new files (made if missing, as for
    :func:`writable_dir`), since atomic writes, SQLite and Optuna's journal lock all create
    files beside it."""
    path = Path(path)
    named = f"{what} {path}"
    refuse_other_than_file(path, named)
    _ready_folder(path.parent, named, own=False)
    if path.exists():
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))  # opened, not changed
        except OSError as exc:
            raise UserError(f"{named}: cannot write to it ({_reason(exc)})") from None
    return path


def database_file(url: str) -> Path | None:
    """The local file of a ``sqlite:`` URL (an MLflow tracking URI or an Optuna storage), else
    None (a server database, or SQLite in memory)."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def writable_storage(url: str, tracking_uri: str) -> None:
    """Check the local file an Optuna storage writes: a journal file or a SQLite database (not
    one in memory, not the MLflow store ``tracking_uri``'s own). A database server is not
    checked here."""
    if "://" not in url:
        writable_file(url.removeprefix("journal:"), "storage")
    elif (database := database_file(url)) is not None:
        store = database_file(tracking_uri)
        if store is not None and database.resolve() == store.resolve():
            raise UserError(f"storage {url}: is the MLflow store's own database; give the study a "
                            f"file of its own (sqlite:///optuna.db, or a journal file)")
        writable_file(database, "storage")
    elif url.startswith("sqlite:"):
        raise UserError(f"storage {url}: an in-memory database lasts one process and is not shared "
                        f"with workers; give a file (sqlite:///study.db) or a journal file")


def _ready_folder(folder: Path, named: str, own: bool, make: bool = True) -> None:
    """Make ``folder`` exist (unless not ``make``) and take new files, or raise a
    :class:`UserError` starting with ``named``; ``own`` says whether ``folder`` is the named
    path itself or its parent."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a link to nowhere: mkdir would fail on it
            raise UserError(f"{named}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        where = "" if own and existing == folder else f"{existing} "
        raise UserError(f"{named}: {where}is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):  # an unnamed file where the OS allows: no trace
            pass
    except OSError as exc:
        raise UserError(f"{named}: cannot write in {existing} ({_reason(exc)})") from None
    if not make:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{named}: cannot make folder {folder} ({_reason(exc)})") from None


def _reason(exc: OSError) -> str:
    """The OS's words for an error (``Read-only file system``), without its Python dressing."""
    return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__

