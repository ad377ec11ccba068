"""The app's Ray setting (`core.scale.setting`, the sidebar control of app.py) without a cluster: an unreachable,
silent or malformed address gives a one-line error and saves nothing; the precedence flag > environment > setting;
with no setting neither the app nor a job imports ray. A real store, real subprocesses, the real app through
AppTest. The setting with a real cluster (saved through the sidebar, used by a launched job): tests/test_ray.py."""
import json
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from core.scale import setting
from core.store import db
from tests.conftest import CHROMIUM, ROOT, start_server, stop_server


@pytest.mark.e2e
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")
def test_an_unreachable_or_malformed_address_is_refused_in_one_line_and_nothing_is_saved(cache, page, monkeypatch):
    """The sidebar control in a browser (AppTest does not deliver a click on a widget of app.py's sidebar while
    one of the real pages runs under it)."""
    monkeypatch.delenv("REDEX_RAY_ADDRESS", raising=False)
    proc, url = start_server(cache)
    try:
        page.goto(url + "/jobs")
        sidebar = page.locator('[data-testid="stSidebar"]')
        sidebar.get_by_text("Heavy jobs run here").wait_for(timeout=60_000)
        for typed, said in (("127.0.0.1:1", "Not saved: unreachable: nothing answers at 127.0.0.1:1"),
                            ("my laptop", "Not saved: 'my laptop' is not a Ray address")):
            box = sidebar.get_by_test_id("stTextInputField")
            box.fill(typed)
            box.press("Enter")
            sidebar.get_by_role("button", name="Check and save").click()
            error = sidebar.locator('[data-testid="stAlert"]').filter(has_text=said)
            error.wait_for(timeout=30_000)  # nothing listens at port 1: refused at once, no Ray started
            assert "\n" not in error.inner_text().strip()
        assert sidebar.get_by_text("Heavy jobs run here").is_visible()
    finally:
        stop_server(proc)
    store = db.get_store()
    assert setting.saved(store) is None and store.query("SELECT count(*) FROM settings")[0][0] == 0


def test_a_port_that_answers_but_is_no_ray_cluster_times_out_instead_of_hanging():
    """A TCP server that accepts and says nothing (not a Ray head): the check gives up at its timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    try:
        result = setting.check(f"127.0.0.1:{port}", timeout_s=5)
    finally:
        server.close()
    assert not result["ok"] and f"127.0.0.1:{port}" in result["error"] and "\n" not in result["error"]


def test_the_flag_wins_over_the_environment_which_wins_over_the_setting(store, monkeypatch):
    monkeypatch.delenv("REDEX_RAY_ADDRESS", raising=False)
    assert setting.for_launch("cluster", {"backbone_id": "b"}, store) == {"backbone_id": "b"}  # nothing set
    setting.save("10.0.0.5:6379", store)
    assert setting.for_launch("cluster", {"backbone_id": "b"}, store) == {"backbone_id": "b", "ray": "10.0.0.5:6379"}
    assert setting.for_launch("sweep", None, store) == {"ray": "10.0.0.5:6379"}
    assert setting.for_launch("scan", {}, store) == {}  # a kind that never runs on Ray
    assert setting.for_launch("embed", {"ray": "local"}, store) == {"ray": "local"}  # --ray local
    monkeypatch.setenv("REDEX_RAY_ADDRESS", "local")
    assert setting.for_launch("embed", {}, store) == {}  # the job reads the environment
    assert setting.effective(store) == setting.Where(None, "env")
    monkeypatch.delenv("REDEX_RAY_ADDRESS")
    assert setting.effective(store) == setting.Where("10.0.0.5:6379", "setting")
    setting.clear(store)
    assert setting.effective(store) == setting.Where(None, None)


def test_the_sidebars_read_is_reused_until_another_process_writes_the_store(store, monkeypatch):
    # Every new session's sidebar reads the setting: it opens the store only after some process wrote to it.
    monkeypatch.delenv("REDEX_RAY_ADDRESS", raising=False)
    opened = []
    real = db._connect
    monkeypatch.setattr(db, "_connect", lambda *a, **k: opened.append(1) or real(*a, **k))
    ttl = setting.READ_TTL_S
    assert setting.saved(store, ttl) is None and len(opened) == 1
    assert setting.saved(store, ttl) is None and len(opened) == 1  # unchanged store: no connection
    code = ("from core.scale import setting; from core.store.db import Store;"
            f" setting.save('10.0.0.7:6379', Store({str(store.path)!r}))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    assert setting.saved(store, ttl) == "10.0.0.7:6379"  # another process's save is seen at once
    assert setting.saved(store, 0.0) == "10.0.0.7:6379" and len(opened) == 3  # max_age 0: always read


NO_RAY = textwrap.dedent("""
    import json, sys
    from streamlit.testing.v1 import AppTest
    from core import jobs
    from core.data import scan, sources
    from core.store.db import get_store

    at = AppTest.from_file("app.py", default_timeout=120).run()  # the router, the sidebar, the Datasets page
    assert not at.exception, at.exception
    store = get_store()
    name = sources.register(sys.argv[1], "noray")
    scan.scan(name, store)
    embed = jobs.launch("embed", name, {"epochs": 1}, store=store)  # a job process of its own, as the app starts
    done = jobs.wait(embed, store, timeout=600)
    # The cluster job's body here, in this process, so that its imports can be seen.
    params = json.dumps({"backbone_id": done["result"]["backbone_id"]})
    cluster = store.execute("INSERT INTO jobs (kind, dataset, params, status, lane) VALUES ('cluster', ?, ?,"
                            " 'queued', 'quick') RETURNING id", [name, params])[0][0]
    code = jobs.run_job(cluster, store)
    rows = {j["id"]: j for j in jobs.list_jobs(store)}
    print(json.dumps({"ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")),
                      "status": [rows[embed]["status"], rows[cluster]["status"], code],
                      "params": rows[embed]["params"], "ran_on": [rows[embed]["ran_on"], rows[cluster]["ran_on"]]}))
""")


def test_without_a_setting_neither_the_app_nor_a_job_imports_ray(cache, image_folder, monkeypatch):
    monkeypatch.delenv("REDEX_RAY_ADDRESS", raising=False)
    done = subprocess.run([sys.executable, "-c", NO_RAY, str(image_folder)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["status"] == ["done", "done", 0], done.stderr[-3000:]
    assert out["ray"] == [] and "ray" not in out["params"] and out["ran_on"] == [None, None]
