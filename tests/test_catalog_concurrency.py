"""Exactly-once ``append_samples`` under concurrent writers (finding 5 of the adversarial audit of 3874b3d).

On 3874b3d two processes appending the same new sample_id at the same instant both committed it (15 of
15 trials): the existence check and the append were two steps, and a Delta blind append never
conflicts. Now each commit carries the Delta app ids of its sample_ids' buckets, a second commit of
a sample_id fails Delta's conflict check, and the loser re-reads and commits only what is new.
"""

from __future__ import annotations

import multiprocessing

import pytest
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError
from _catalog_cases import make_record

from catalog import commit, rows, store
from catalog.errors import CatalogError, CommitConflictError, RecordExistsError
from catalog.rows import sample_app_ids
from catalog.store import open_catalog

PROCESSES = 3
TRIALS = 6  # half on an existing table, half racing to create it


def _race_worker(index: int, roots: list[str], barrier, results, storage_options: dict | None) -> None:
    """Append, for every trial root, the shared sample_ids 7 and 8 plus one id of this process only."""
    own = 100 + index
    for root in roots:
        cat = open_catalog(root, storage_options=storage_options)
        records = [make_record(7), make_record(8), make_record(own)]
        barrier.wait(timeout=60)
        try:
            cat.append_samples(records, commit_metadata={"writer": str(own)})
            results.put((root, "ok"))
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            results.put((root, f"{type(exc).__name__}: {exc}"))


def _race(roots: list[str], storage_options: dict | None = None) -> list[tuple[str, str]]:
    """Run PROCESSES fresh interpreters appending to every root in step; return their outcomes."""
    ctx = multiprocessing.get_context("spawn")  # deltalake's runtime does not survive fork
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_race_worker, args=(k, roots, barrier, results, storage_options))
             for k in range(PROCESSES)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in range(PROCESSES * len(roots))]
    for proc in procs:
        # Every append's outcome is in `outcomes`. The exit code is not checked: deltalake 1.6.6 and
        # pyarrow now and then abort in interpreter teardown ("terminate called without an active
        # exception"), after all work is done, on 3874b3d as well (about 1 in 10 long runs).
        proc.join(timeout=60)
        assert proc.exitcode is not None
    return outcomes


def _check_each_id_once(roots: list[str], outcomes: list[tuple[str, str]], storage_options=None) -> None:
    assert [o for o in outcomes if o[1] != "ok"] == []  # every process returns without error
    for root in roots:
        ids = open_catalog(root, storage_options=storage_options).read_table(columns=["sample_id"])
        ids = ids["sample_id"].to_pylist()
        assert len(ids) == len(set(ids)), (root, sorted(ids))  # no sample_id twice
        assert {"case_0007", "case_0008"} <= set(ids) and len(ids) == 2 + PROCESSES, (root, sorted(ids))


def test_append_samples_racing_processes_record_each_sample_id_once(tmp_path):
    roots = [str(tmp_path / f"trial{i}") for i in range(TRIALS)]
    for root in roots[: TRIALS // 2]:  # an existing table (a run in progress) ...
        open_catalog(root).append_samples([make_record(1)])
    outcomes = _race(roots)  # ... and a new root (the first batch of several workers)
    _check_each_id_once(roots[TRIALS // 2:], outcomes)
    for root in roots[: TRIALS // 2]:
        ids = open_catalog(root).read_table(columns=["sample_id"])["sample_id"].to_pylist()
        assert len(ids) == len(set(ids)) == 3 + PROCESSES


@pytest.mark.slow
def test_append_samples_racing_processes_on_s3_record_each_sample_id_once():
    from s3_server import local_s3_server

    with local_s3_server(bucket="race") as s3:
        roots = [f"s3://race/trial{i}" for i in range(TRIALS)]
        for root in roots[: TRIALS // 2]:
            open_catalog(root, storage_options=s3.delta_options).append_samples([make_record(1)])
        outcomes = _race(roots, s3.delta_options)
        _check_each_id_once(roots[TRIALS // 2:], outcomes, s3.delta_options)
        for root in roots[: TRIALS // 2]:
            ids = open_catalog(root, storage_options=s3.delta_options).read_table(columns=["sample_id"])
            assert len(ids) == len(set(ids["sample_id"].to_pylist())) == 3 + PROCESSES


def _commit_between_read_and_write(monkeypatch, root, other_records) -> list[int]:
    """Make another writer commit ``other_records`` right after the next append has read the table."""
    original = rows.drop_committed
    versions: list[int] = []

    def drop_then_let_other_commit(table, new):
        kept = original(table, new)
        if not versions:
            versions.append(-1)  # the other writer's own append passes straight through
            versions[0] = open_catalog(root).append_samples(other_records)
        return kept

    monkeypatch.setattr(rows, "drop_committed", drop_then_let_other_commit)
    return versions


def test_append_samples_same_row_committed_between_read_and_write_is_a_no_op(tmp_path, monkeypatch):
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(0)])
    other = _commit_between_read_and_write(monkeypatch, tmp_path, [make_record(5, timings_s={"generate": 9.0})])
    assert cat.append_samples([make_record(5)]) == other[0] == 1  # the version holding the row
    assert cat.read_table(columns=["sample_id"])["sample_id"].to_pylist().count("case_0005") == 1
    assert cat.version == 1  # no second commit


def test_append_samples_changed_row_committed_between_read_and_write_raises(tmp_path, monkeypatch):
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(0)])
    _commit_between_read_and_write(monkeypatch, tmp_path, [make_record(5, seed=77)])
    with pytest.raises(RecordExistsError, match=r"sample_id='case_0005' with different seed\."):
        cat.append_samples([make_record(5), make_record(6)])
    ids = cat.read_table(columns=["sample_id"])["sample_id"].to_pylist()
    assert sorted(ids) == ["case_0000", "case_0005"]  # the batch is all or nothing


def test_append_samples_other_ids_committed_between_read_and_write_need_no_retry(tmp_path, monkeypatch):
    assert set(sample_app_ids(["case_0005"])).isdisjoint(sample_app_ids(["case_0006"]))
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(0)])
    _commit_between_read_and_write(monkeypatch, tmp_path, [make_record(6)])
    calls = []
    monkeypatch.setattr(commit.time, "sleep", calls.append)
    assert cat.append_samples([make_record(5)]) == 2
    assert calls == []  # Delta saw no conflict: different app ids
    assert sorted(cat.read_table()["sample_id"].to_pylist()) == ["case_0000", "case_0005", "case_0006"]


def test_append_samples_table_created_between_read_and_write_is_retried(tmp_path, monkeypatch):
    """Two writers of a new root: delta-rs does not conflict-check a create, so ours must fail and re-read."""
    cat, other = open_catalog(tmp_path), open_catalog(tmp_path)
    original = store.Catalog._open_or_none
    state = {"first": True}

    def none_then_other_creates(self, name):
        if self is cat and state.pop("first", False):
            other.append_samples([make_record(3, timings_s={"generate": 2.0})])
            return None  # our read happened before the other writer's create
        return original(self, name)

    monkeypatch.setattr(store.Catalog, "_open_or_none", none_then_other_creates)
    assert cat.append_samples([make_record(3)]) == 0
    assert cat.read_table()["sample_id"].to_pylist() == ["case_0003"]


def test_append_samples_gives_up_after_repeated_conflicts(tmp_path, monkeypatch):
    cat = open_catalog(tmp_path)
    cat.append_samples([make_record(0)])
    sleeps: list[float] = []
    monkeypatch.setattr(commit.time, "sleep", sleeps.append)

    def always_conflicts(*args, **kwargs):
        raise CommitFailedError("Failed to commit transaction: Concurrent transaction failed.")

    monkeypatch.setattr(commit, "write_deltalake", always_conflicts)
    with pytest.raises(CommitConflictError, match=(
            r"^append_samples expects a commit to succeed within 8 attempts, but got 8 conflicts with concurrent "
            r"writers at .*catalog/samples, the last: Failed to commit transaction: Concurrent transaction failed\. "
            r"Run it again; committed rows are never repeated\.$")):
        cat.append_samples([make_record(1)])
    assert issubclass(CommitConflictError, CatalogError)
    assert len(sleeps) == commit.COMMIT_ATTEMPTS - 1
    caps = [min(commit.COMMIT_BACKOFF_MAX_S, commit.COMMIT_BACKOFF_S * 2 ** k) for k in range(len(sleeps))]
    assert all(cap / 2 <= s <= cap for s, cap in zip(sleeps, caps, strict=True))
    assert cat.version == 0


def test_append_samples_commit_carries_app_ids_and_metadata(tmp_path):
    cat = open_catalog(tmp_path)
    version = cat.append_samples([make_record(i) for i in range(3)], commit_metadata={"spec_id": "s1"})
    later = cat.append_samples([make_record(3)])
    table = DeltaTable(cat.table_uri("samples"))
    for app_id in sample_app_ids([f"case_{i:04d}" for i in range(3)]):
        assert table.transaction_version(app_id) == version == 0  # the version the commit aimed at
    assert [table.transaction_version(a) for a in sample_app_ids(["case_0003"])] == [later] == [1]
    entry = cat.history()[1]
    assert (entry["version"], entry["spec_id"], entry["ctfactory.rows"]) == (0, "s1", "3")
    assert entry["ctfactory.commit_id"]
    assert sample_app_ids(["case_0001", "case_0001"]) == sample_app_ids(["case_0001"])
    assert all(a.startswith(rows.APP_ID_PREFIX) for a in sample_app_ids(["x", "y"]))
