"""A persistent LangChain `RecordManager` over sqlite3: what `langchain_core.indexing.index` has written, by key.

    python -c "from prodtune.rag.records import SQLiteRecordManager as R; r = R('ns', '/tmp/r.sqlite3'); print(r.exists(['a']))"

`index()` needs a record manager to skip unchanged documents and to delete outdated ones. langchain-core ships only
`InMemoryRecordManager`, forgotten when the process ends; the SQL one
lives in langchain-classic / langchain-community on SQLAlchemy, neither of which is in our pins. This is the same
table (key, namespace, group_id, updated_at) in the standard library's sqlite3.

Why not keep the records in the Chroma metadata instead: `index()` refreshes the timestamp of every document it
sees (twice per batch), so each rerun would rewrite the metadata of every stored product through Chroma's log
(measured on this machine: 22.8k Chroma metadata updates/s, ~105 s for the two passes over 1.2M products; this
file does a whole unchanged rerun's bookkeeping, lookups included, in 22 s, 194 MiB for 1.2M records).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from langchain_core.indexing import RecordManager

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    namespace TEXT NOT NULL, key TEXT NOT NULL, group_id TEXT, updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX IF NOT EXISTS records_time ON records (namespace, updated_at);
CREATE INDEX IF NOT EXISTS records_group ON records (namespace, group_id);
"""


class SQLiteRecordManager(RecordManager):
    """Records of one namespace in a SQLite file; the async methods run the sync ones (SQLite is local and fast).

    Args:
        namespace: records of other namespaces in the same file are never read or touched.
        path: the SQLite file (created with its folder).
    """

    def __init__(self, namespace: str, path: str | Path) -> None:
        super().__init__(namespace)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path)
        self._last = 0.0
        self.create_schema()

    def create_schema(self) -> None:
        """Create the table and its indexes if missing."""
        self.conn.executescript(_SCHEMA)

    async def acreate_schema(self) -> None:
        self.create_schema()

    def get_time(self) -> float:
        """Seconds since the epoch, strictly increasing within the process (cleanup compares with `before`)."""
        self._last = max(time.time(), self._last + 1e-6)
        return self._last

    async def aget_time(self) -> float:
        return self.get_time()

    def update(self, keys: Sequence[str], *, group_ids: Sequence[str | None] | None = None,
               time_at_least: float | None = None) -> None:
        """Insert or refresh `keys` (with their group ids) at the current time."""
        if group_ids is not None and len(keys) != len(group_ids):
            raise ValueError(f"{len(keys)} keys but {len(group_ids)} group ids")
        now = self.get_time()
        if time_at_least is not None and now < time_at_least:
            raise ValueError(f"the clock went back: {now} < time_at_least {time_at_least}")
        groups = group_ids if group_ids is not None else [None] * len(keys)
        with self.conn:
            # A refresh without group ids (index() does that for skipped documents) keeps the stored group.
            self.conn.executemany(
                "INSERT INTO records (namespace, key, group_id, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET updated_at = excluded.updated_at, "
                "group_id = COALESCE(excluded.group_id, records.group_id)",
                [(self.namespace, k, g, now) for k, g in zip(keys, groups)],
            )

    async def aupdate(self, keys: Sequence[str], *, group_ids: Sequence[str | None] | None = None,
                      time_at_least: float | None = None) -> None:
        self.update(keys, group_ids=group_ids, time_at_least=time_at_least)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is recorded."""
        found: set[str] = set()
        for s in range(0, len(keys), 900):  # SQLite's default limit on bound parameters is 999
            chunk = list(keys[s : s + 900])
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.conn.execute(
                f"SELECT key FROM records WHERE namespace = ? AND key IN ({marks})", [self.namespace, *chunk]))
        return [k in found for k in keys]

    async def aexists(self, keys: Sequence[str]) -> list[bool]:
        return self.exists(keys)

    def list_keys(self, *, before: float | None = None, after: float | None = None,
                  group_ids: Sequence[str] | None = None, limit: int | None = None) -> list[str]:
        """Keys updated before/after a time and/or in some groups, at most `limit`."""
        sql, args = "SELECT key FROM records WHERE namespace = ?", [self.namespace]
        if before is not None:
            sql, args = sql + " AND updated_at < ?", [*args, before]
        if after is not None:
            sql, args = sql + " AND updated_at > ?", [*args, after]
        if group_ids is not None:
            sql += f" AND group_id IN ({','.join('?' * len(group_ids))})"
            args += list(group_ids)
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        return [r[0] for r in self.conn.execute(sql, args)]

    async def alist_keys(self, *, before: float | None = None, after: float | None = None,
                         group_ids: Sequence[str] | None = None, limit: int | None = None) -> list[str]:
        return self.list_keys(before=before, after=after, group_ids=group_ids, limit=limit)

    def delete_keys(self, keys: Sequence[str]) -> None:
        """Forget `keys`."""
        with self.conn:
            self.conn.executemany("DELETE FROM records WHERE namespace = ? AND key = ?", [(self.namespace, k) for k in keys])

    async def adelete_keys(self, keys: Sequence[str]) -> None:
        self.delete_keys(keys)

    # Beyond the RecordManager interface: what stage 05 reports and how it repairs a lost or stale file.

    def count(self) -> int:
        """Number of records in the namespace."""
        return self.conn.execute("SELECT COUNT(*) FROM records WHERE namespace = ?", [self.namespace]).fetchone()[0]

    def groups(self) -> set[str]:
        """The distinct group ids recorded (for stage 05: the stored product uids)."""
        rows = self.conn.execute("SELECT DISTINCT group_id FROM records WHERE namespace = ? AND group_id IS NOT NULL",
                                 [self.namespace])
        return {r[0] for r in rows}

    def clear(self) -> None:
        """Forget the namespace."""
        with self.conn:
            self.conn.execute("DELETE FROM records WHERE namespace = ?", [self.namespace])

    def clear_others(self, prefix: str) -> int:
        """Forget the other namespaces that start with `prefix` (e.g. earlier collections of one name); return how many records went."""
        with self.conn:
            cur = self.conn.execute("DELETE FROM records WHERE substr(namespace, 1, ?) = ? AND namespace != ?",
                                    [len(prefix), prefix, self.namespace])
        return cur.rowcount

    def close(self) -> None:
        """Close the SQLite connection."""
        self.conn.close()
