"""Delta commits of the catalog: tagged writes, finding the version a write made, retrying conflicts.

Every commit carries ``ctfactory.*`` custom metadata (operation, row count, schema version and a
random commit id), so a writer finds its own version even when others commit right after it.

Exactly-once commits: a commit of sample_ids carries the app ids of their buckets (see
:mod:`catalog.store`). 4096 buckets keep the table state small (one txn entry per bucket, not per row)
while two concurrent commits of a few new sample_ids each rarely share a bucket by chance (that only
costs a retry, up to :data:`COMMIT_ATTEMPTS` with jittered exponential backoff).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import Transaction

from catalog.errors import CommitConflictError, describe_cause
from catalog.schema import SCHEMA_VERSION

logger = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 8
COMMIT_BACKOFF_S = 0.05  # first retry waits up to this long (jittered); doubles per attempt
COMMIT_BACKOFF_MAX_S = 1.0
HISTORY_SEARCH = 64  # commits searched back for one's own commit id


class TableCreatedConcurrently(Exception):
    """Another writer created the samples table between our read and our commit (retried)."""


def retry_commits(operation: str, attempt: Callable[[], int], *, where: str) -> int:
    """Run ``attempt`` until it commits; retry Delta commit conflicts with jittered backoff.

    Raises:
        CommitConflictError: every attempt met a conflict.
    """
    for number in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return attempt()
        except (CommitFailedError, TableCreatedConcurrently) as exc:
            conflict = exc
        logger.info("%s: commit conflict (attempt %d of %d), retrying: %s", operation, number,
                    COMMIT_ATTEMPTS, conflict)
        if number < COMMIT_ATTEMPTS:
            cap = min(COMMIT_BACKOFF_MAX_S, COMMIT_BACKOFF_S * 2 ** (number - 1))
            time.sleep(random.uniform(cap / 2, cap))
    raise CommitConflictError(
        f"{operation} expects a commit to succeed within {COMMIT_ATTEMPTS} attempts, but got "
        f"{COMMIT_ATTEMPTS} conflicts with concurrent writers at {where}, the last: "
        f"{describe_cause(conflict)}. Run it again; committed rows are never repeated."
    )


def commit(target: DeltaTable | str, data: pa.Table, operation: str, metadata: Mapping[str, Any] | None, *,
           table_name: str, storage_options: Mapping[str, str] | None, reopen: Callable[[], DeltaTable],
           mode: str = "append", predicate: str | None = None,
           app_transactions: Sequence[Transaction] = ()) -> int:
    """Write ``data`` to ``target`` (an open table, or a URI to create) as one tagged commit; return its version.

    ``reopen`` opens the table afresh, to find the commit when ``target`` was a URI or others wrote since.
    """
    custom = {str(k): str(v) for k, v in (metadata or {}).items()}
    token = uuid.uuid4().hex
    custom.update({"ctfactory.operation": operation, "ctfactory.rows": str(data.num_rows),
                   "ctfactory.schema_version": str(SCHEMA_VERSION), "ctfactory.commit_id": token})
    write_deltalake(
        target, data, mode=mode, predicate=predicate, schema_mode="merge", storage_options=storage_options or None,
        commit_properties=CommitProperties(custom_metadata=custom, app_transactions=list(app_transactions) or None,
                                           max_commit_retries=0 if mode == "error" else None),
    )
    version = find_commit(target if isinstance(target, DeltaTable) else None, token, reopen)
    logger.info("%s: committed %d rows to %s as version %d", operation, data.num_rows, table_name, version)
    return version


def find_commit(table: DeltaTable | None, token: str, reopen: Callable[[], DeltaTable]) -> int:
    """Return the version of the commit carrying ``token`` (other writers may have committed since)."""
    if table is not None:  # after a write the table object is at the version it committed
        entry = table.history(limit=1)
        if entry and entry[0].get("ctfactory.commit_id") == token:
            return int(entry[0]["version"])
    table = reopen()
    for entry in table.history(limit=HISTORY_SEARCH):
        if entry.get("ctfactory.commit_id") == token:
            return int(entry["version"])
    return table.version()
