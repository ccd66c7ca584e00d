"""The SQLite side of a gallery: tables, connection settings, and the gallery's identity.

SQLite is the source of truth of a gallery, embeddings included: the FAISS file next to it is a
snapshot that can always be rebuilt from these tables.
"""

import sqlite3
from pathlib import Path

SQLITE_FILE = "gallery.sqlite"  # in the gallery folder
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE images (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    uri       TEXT,
    sha256    TEXT NOT NULL UNIQUE,
    camera    TEXT,
    timestamp REAL,
    width     INTEGER NOT NULL CHECK (width > 0),
    height    INTEGER NOT NULL CHECK (height > 0),
    added_at  REAL NOT NULL
);
CREATE INDEX images_camera ON images (camera);
CREATE INDEX images_timestamp ON images (timestamp);

-- AUTOINCREMENT: person ids are never reused, so "every id above the snapshot's watermark is
-- new" holds even after removals.
CREATE TABLE persons (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id  INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    x1        REAL NOT NULL,
    y1        REAL NOT NULL,
    x2        REAL NOT NULL,
    y2        REAL NOT NULL,
    det_score REAL NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX persons_image ON persons (image_id);

-- Persons removed since the last snapshot: the snapshot on disk still holds their vectors, so
-- opening the gallery removes them from the loaded index. Cleared by each snapshot.
CREATE TABLE removed_persons (
    person_id INTEGER PRIMARY KEY
);

-- Bulk ingest jobs, so that they survive restarts and can be resumed.
CREATE TABLE jobs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT NOT NULL,
    spec       TEXT NOT NULL,
    status     TEXT NOT NULL
               CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    done       INTEGER NOT NULL DEFAULT 0,
    total      INTEGER,
    error      TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);

-- The inputs of each job (indexer/jobs.py). A re-run skips an item that is done while its file
-- keeps the size and modification time recorded when it was done, without reading it again.
CREATE TABLE job_items (
    job_id    INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq       INTEGER NOT NULL,
    path      TEXT NOT NULL,
    camera    TEXT,
    timestamp REAL,
    status    TEXT NOT NULL DEFAULT 'pending'
              CHECK (status IN ('pending', 'added', 'duplicate', 'failed')),
    size      INTEGER,
    mtime_ns  INTEGER,
    image_id  INTEGER,
    error     TEXT,
    PRIMARY KEY (job_id, seq),
    UNIQUE (job_id, path)
);
"""


# Indexes added since galleries of SCHEMA_VERSION 1 were first made. They change no data (an
# older psearch reads the gallery as before), so opening a gallery adds them where missing.
ADDED_INDEXES = ("CREATE INDEX IF NOT EXISTS images_uri ON images (uri)",)


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit ``BEGIN``s), WAL journal.

    ``synchronous=FULL``: a commit is on disk when it returns, so an image acknowledged to the
    caller survives a crash of the process or of the machine. ``check_same_thread=False`` only
    so that :meth:`Gallery.close` can close the connections of other threads; each thread uses
    its own connection.
    """
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA foreign_keys = ON")
    return connection


def create_tables(connection: sqlite3.Connection, meta: dict[str, str]) -> None:
    """Create all tables and record the gallery's identity, in one transaction."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                connection.execute(statement)
        add_missing_indexes(connection)
        rows = {**meta, "schema_version": str(SCHEMA_VERSION)}
        connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows.items())
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def add_missing_indexes(connection: sqlite3.Connection) -> None:
    """Create the :data:`ADDED_INDEXES` a gallery lacks."""
    for statement in ADDED_INDEXES:
        connection.execute(statement)


def read_meta(connection: sqlite3.Connection) -> dict[str, str]:
    """All ``meta`` rows; empty when the table does not exist (not a complete gallery)."""
    try:
        return dict(connection.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError:
        return {}


def write_meta(connection: sqlite3.Connection, key: str, value: str) -> None:
    """Set one ``meta`` row (its own transaction in autocommit mode)."""
    connection.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def last_person_id(connection: sqlite3.Connection) -> int:
    """The largest person id ever assigned (0 when none): removed persons included."""
    row = connection.execute("SELECT seq FROM sqlite_sequence WHERE name = 'persons'").fetchone()
    return int(row[0]) if row else 0
