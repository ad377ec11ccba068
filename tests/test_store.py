"""The DuckDB store: migrations, transactions, and many processes using one file at once."""
import subprocess
import sys
import textwrap

import pytest

from core import jobs
from core.store.db import Store
from core.store.migrations import MIGRATIONS
from tests.conftest import wait_until


def test_migrations_run_once_and_are_versioned(cache):
    path = cache / "a.duckdb"
    s = Store(path)
    assert s.schema_version() == len(MIGRATIONS)
    s.execute("INSERT INTO job_events (job_id, level, message) VALUES (1, 'info', 'kept')")
    again = Store(path)  # re-opening must not re-run (or fail on) applied migrations
    assert again.schema_version() == len(MIGRATIONS)
    assert again.query("SELECT message FROM job_events") == [("kept",)]


def test_write_is_all_or_nothing(store):
    with pytest.raises(RuntimeError):
        with store.write() as con:
            con.execute("INSERT INTO job_events (job_id, level, message) VALUES (1, 'info', 'lost')")
            raise RuntimeError("boom")
    assert store.query("SELECT count(*) FROM job_events") == [(0,)]


def test_parameters_are_not_sql(store):
    evil = "x'); DROP TABLE jobs; --"
    store.execute("INSERT INTO job_events (job_id, level, message) VALUES (?, 'info', ?)", [1, evil])
    assert store.query("SELECT message FROM job_events") == [(evil,)]
    assert store.query("SELECT count(*) FROM jobs") == [(0,)]


WRITER = textwrap.dedent("""
    import sys
    from core.store.db import Store
    s = Store(sys.argv[1])
    for i in range(int(sys.argv[3])):
        s.execute("INSERT INTO job_events (job_id, level, message) VALUES (?, 'info', ?)", [int(sys.argv[2]), str(i)])
        s.query("SELECT count(*) FROM job_events")
""")


def test_app_cli_and_jobs_use_the_store_at_once(store, image_folder):
    """Four writer processes, the real CLI and a real scan job, all at once: no lock error, nothing lost."""
    from core.data import sources

    n = 60
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.path), str(1000 + w), str(n)],
                                stderr=subprocess.PIPE, text=True) for w in range(4)]
    name = sources.register(str(image_folder), "concurrent")
    job_id = jobs.launch("scan", name, store=store)
    clis = [subprocess.Popen([sys.executable, "-m", "core.cli", "jobs"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(3)]
    # The app's own thread keeps reading and writing meanwhile.
    for i in range(n):
        store.execute("INSERT INTO job_events (job_id, level, message) VALUES (1099, 'info', ?)", [str(i)])
        jobs.list_jobs(store)
    for p in writers + clis:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "lock" not in err.lower()
    job = jobs.wait(job_id, store, timeout=120)
    assert job["status"] == "done", job
    counts = dict(store.query("SELECT job_id, count(*) FROM job_events WHERE job_id >= 1000 GROUP BY 1"))
    assert counts == {1000: n, 1001: n, 1002: n, 1003: n, 1099: n}
    assert store.query("SELECT count(*) FROM images WHERE dataset = ?", [name]) == [(60,)]


READER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from core.store.db import Store
    s = Store(sys.argv[1])
    ready, stop = Path(sys.argv[2]), Path(sys.argv[3])
    end = time.monotonic() + 120  # a writer that waits for the readers to stop would wait this long
    while time.monotonic() < end and not stop.exists():
        s.query("SELECT count(*) FROM job_events")
        ready.touch()
""")


def test_a_stream_of_readers_does_not_starve_a_writer(store, tmp_path):
    """Readers polling back to back (pages, CLIs, tests) must not keep a job from writing its progress."""
    stop = tmp_path / "stop"
    ready = [tmp_path / f"reading-{i}" for i in range(4)]
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(store.path), str(r), str(stop)]) for r in ready]
    try:
        wait_until(lambda: all(r.exists() for r in ready) or any(p.poll() is not None for p in readers),
                   what="4 readers in full swing")
        assert all(p.poll() is None for p in readers), "a reader stopped before the writes"
        for i in range(20):
            store.execute("INSERT INTO job_events (job_id, level, message) VALUES (7, 'info', ?)", [str(i)])
        # Readers stop only when told (or after 120 s): all still reading means the writes did not wait for them.
        still_reading = sum(p.poll() is None for p in readers)
    finally:
        stop.touch()
    for p in readers:
        assert p.wait(timeout=60) == 0
    assert store.query("SELECT count(*) FROM job_events WHERE job_id = 7") == [(20,)]
    assert still_reading == 4, "the writes had to wait until the readers stopped"
