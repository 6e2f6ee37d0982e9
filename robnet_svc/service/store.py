"""The job store: one SQLite file (``STATE/jobs.sqlite``, WAL mode) that is also the queue.

Every change is one transaction, so a server or worker killed at any point (``kill -9``)
leaves the store consistent: a job is ``queued``, ``running``, ``succeeded``, ``failed`` or
``cancelled``, never half of two. Queued jobs are claimed oldest first by one
``BEGIN IMMEDIATE`` transaction; on start the server puts jobs left ``running`` by a dead
server back in the queue (their worker resumes from the last checkpoint).

A job's ``attempt`` counts its claims; a worker writes (progress, the result) only while
the job is ``running`` under the attempt it was started for, so a late write of a worker
that outlived its server can never overwrite a newer attempt.

The schema is versioned with ``PRAGMA user_version``; a store written by a newer
robnet-svc is refused rather than guessed at.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from robnet_svc.errors import RobnetError

SCHEMA_VERSION = 1
STORE_FILE = "jobs.sqlite"
FINAL_STATES = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- submission order (the queue order)
    id TEXT NOT NULL UNIQUE,                 -- random, 32 hex digits
    owner TEXT NOT NULL,                     -- sha256 of the submitting token (never the token)
    command TEXT NOT NULL CHECK (command IN ('harden', 'certify')),
    settings TEXT NOT NULL,                  -- JSON: every option, resolved and validated
    input_sha256 TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempt INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    progress TEXT,                           -- JSON, written by the worker
    summary TEXT,                            -- JSON: summary.json of a succeeded job
    artifacts TEXT,                          -- JSON: {name: {"sha256": ..., "size": ...}}
    error TEXT,                              -- one line, for a failed job
    exit_code INTEGER                        -- the CLI's exit code of the run
);
CREATE INDEX jobs_state ON jobs (state, seq);
CREATE INDEX jobs_owner ON jobs (owner, seq);
"""


class JobStore:
    """The jobs of one state folder. Thread- and process-safe: each call opens its own
    connection (cheap for SQLite) and runs in one transaction."""

    def __init__(self, state_dir: str | Path):
        self.path = Path(state_dir) / STORE_FILE
        with self._connect() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RobnetError(f"job store {self.path} has schema version {version}; this robnet-svc "
                                  f"knows up to {SCHEMA_VERSION}: use a newer robnet-svc or another --state-dir")
            if version == 0:
                db.execute("PRAGMA journal_mode=WAL")  # persistent: every later connection uses WAL
                db.execute("BEGIN IMMEDIATE")
                if db.execute("PRAGMA user_version").fetchone()[0] == 0:  # no other process was first
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions only
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("PRAGMA synchronous=FULL")
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------ the API's side

    def add(self, owner: str, command: str, settings: dict[str, Any], input_sha256: str,
            job_id: str | None = None) -> str:
        """Queue a new job; returns its id."""
        job_id = job_id or new_job_id()
        with self._transaction() as db:
            db.execute("INSERT INTO jobs (id, owner, command, settings, input_sha256, state, created) "
                       "VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                       (job_id, owner, command, json.dumps(settings), input_sha256, time.time()))
        return job_id

    def get(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The job as a dict (JSON columns decoded); None if absent or ``owner`` differs."""
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return _decode(row)

    def list(self, owner: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Jobs, newest first (only ``owner``'s when given)."""
        with self._connect() as db:
            if owner is None:
                rows = db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE owner = ? ORDER BY seq DESC LIMIT ?",
                                  (owner, limit)).fetchall()
        return [_decode(r) for r in rows]

    def request_cancel(self, job_id: str) -> str:
        """Cancel a queued job at once, flag a running one (the scheduler stops its worker);
        returns the state after the call."""
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            state = row["state"]
            if state == "queued":
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, exit_code = 130 WHERE id = ?",
                           (time.time(), job_id))
                return "cancelled"
            if state == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return state

    def delete(self, job_id: str) -> bool:
        """Forget a finished job (the caller removes its folder); False if it is not finished."""
        with self._transaction() as db:
            cur = db.execute("DELETE FROM jobs WHERE id = ? AND state IN ('succeeded', 'failed', 'cancelled')",
                             (job_id,))
            return cur.rowcount == 1

    # ------------------------------------------------------------------ the scheduler's side

    def requeue_running(self) -> list[str]:
        """Jobs left ``running`` by a server that died: back to the queue (to resume)."""
        with self._transaction() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = 'running'")]
            db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running' AND cancel_requested = 0")
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, exit_code = 130 "
                       "WHERE state = 'running' AND cancel_requested = 1", (time.time(),))
        return ids

    def claim_next(self) -> tuple[str, int] | None:
        """Mark the oldest queued job running; returns (id, attempt) or None."""
        with self._transaction() as db:
            row = db.execute("SELECT id, attempt FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            attempt = row["attempt"] + 1
            db.execute("UPDATE jobs SET state = 'running', attempt = ?, started = COALESCE(started, ?) "
                       "WHERE id = ?", (attempt, time.time(), row["id"]))
        return row["id"], attempt

    def cancel_requested(self) -> set[str]:
        with self._connect() as db:
            return {r["id"] for r in db.execute(
                "SELECT id FROM jobs WHERE state = 'running' AND cancel_requested = 1")}

    def worker_gone(self, job_id: str, attempt: int, message: str) -> None:
        """The worker of ``attempt`` exited without recording a result: cancelled if that was
        asked for, else failed with ``message``."""
        with self._transaction() as db:
            row = db.execute("SELECT state, attempt, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "running" or row["attempt"] != attempt:
                return
            if row["cancel_requested"]:
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, exit_code = 130 WHERE id = ?",
                           (time.time(), job_id))
            else:
                db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ?, exit_code = 3 WHERE id = ?",
                           (time.time(), message, job_id))

    # ------------------------------------------------------------------ the worker's side

    def set_progress(self, job_id: str, attempt: int, progress: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND attempt = ? AND state = 'running'",
                       (json.dumps(progress), job_id, attempt))

    def finish(self, job_id: str, attempt: int, state: str, *, summary: dict | None = None,
               artifacts: dict | None = None, error: str | None = None, exit_code: int = 0,
               progress: dict | None = None) -> bool:
        """Record the result of ``attempt`` (ignored if the job moved on); True if recorded."""
        assert state in FINAL_STATES
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, summary = ?, artifacts = ?, error = ?, exit_code = ?, "
                "progress = COALESCE(?, progress) WHERE id = ? AND attempt = ? AND state = 'running'",
                (state, time.time(), _json(summary), _json(artifacts), error, exit_code, _json(progress),
                 job_id, attempt))
            return cur.rowcount == 1


def new_job_id() -> str:
    return uuid.uuid4().hex


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    job = dict(row)
    for key in ("settings", "progress", "summary", "artifacts"):
        job[key] = json.loads(job[key]) if job[key] else None
    return job
