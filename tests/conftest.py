"""Shared fixtures: every test gets its own cache folder (its own DuckDB file) and real images."""
from __future__ import annotations

import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import config
from core.data.idx import load_fashion_mnist
from core.store import db
from tests.app_server import free_port, start_server, stop_server  # noqa: F401  (tests import them from here)


@pytest.fixture(scope="session", autouse=True)
def hermetic_hub(tmp_path_factory):
    """No test reaches the Hugging Face Hub or reads the user's HF cache: an empty HF_HOME and
    HF_HUB_OFFLINE=1, for this process (huggingface_hub read them at import) and the jobs it starts.
    Tests of the online path point huggingface_hub at a server on 127.0.0.1 themselves."""
    from huggingface_hub import constants

    home = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HF_HUB_CACHE", raising=False)
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh REDEX_CACHE for this test (child processes inherit it)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("REDEX_CACHE", str(path))
    db._stores.clear()
    yield config.cache_dir()
    if (path / "redex.duckdb").exists():  # no job of a test outlives it, even when the test failed
        from core import jobs
        store = db.get_store()
        for job in jobs.list_jobs(store):
            if job["status"] in jobs.ACTIVE:
                jobs.cancel(job["id"], store, wait_s=5)
    db._stores.clear()


@pytest.fixture
def store(cache):
    return db.get_store()


@pytest.fixture(scope="session")
def fmnist_test():
    """Real Fashion-MNIST test split: uint8 [10000, 28, 28], int64 [10000]."""
    return load_fashion_mnist(config.fashion_mnist_dir(), "test")


def png_bytes(arr: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path, fmnist_test) -> Path:
    """An ImageFolder of 60 real Fashion-MNIST images: train/ and test/, 3 classes x (15 + 5)."""
    return write_image_folder(tmp_path / "folder", fmnist_test)


def write_image_folder(root: Path, fmnist_test) -> Path:
    """`image_folder`'s 60 images written under `root`."""
    images, labels = fmnist_test
    for cls in (0, 1, 2):
        idx = np.flatnonzero(labels == cls)[:20]
        for j, i in enumerate(idx):
            split = "train" if j < 15 else "test"
            path = root / split / f"class{cls}" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(images[i]))
    return root


def build_clustered(store, image_folder):
    """The 60-image folder plus planted duplicates: a byte copy, a re-encoded (pixel-identical) copy,
    and the same image filed under another class; scanned, embedded and clustered by the CLI."""
    from core.cli import main as cli
    from core.data import scan, sources
    from core.embed import embeddings
    from core.embed.backbones import DEFAULT_BACKBONE

    src = next((image_folder / "train" / "class0").iterdir())
    shutil.copy(src, image_folder / "train" / "class0" / "bytecopy.png")
    from PIL import Image
    Image.open(src).save(image_folder / "train" / "class0" / "recoded.bmp")
    shutil.copy(src, image_folder / "train" / "class1" / "mislabelled.png")
    name = sources.register(str(image_folder), "grp")
    scan.scan(name, store)
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=2, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    assert cli(["cluster", name]) == 0
    return name, bid, src.relative_to(image_folder).as_posix()


def store_template(root: Path, build) -> tuple[Path, object]:
    """`build(store, folder)` run once in a store folder of its own under `root`, over `image_folder`'s 60
    images written to `root / "folder"`: (the store folder, what `build` returned). Tests start from a copy
    of it (`copy_store`), so a fixture that trains and clusters runs once per test worker, not per test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDEX_CACHE", str(root / "cache"))
        db._stores.clear()
        store = db.get_store()
        built = build(store, write_image_folder(root / "folder", load_fashion_mnist(config.fashion_mnist_dir(), "test")))
        store.execute("CHECKPOINT")
        db._stores.clear()
    return root / "cache", built


def copy_store(template: tuple[Path, object], cache: Path):
    """This test's own copy of a `store_template` (a real DuckDB file, checkpoints, snapshots) in `cache`,
    over the template's image folder, which tests must not change. Returns what its build returned."""
    folder, built = template
    db._stores.clear()
    shutil.copytree(folder, cache, dirs_exist_ok=True)
    return built


@pytest.fixture(scope="session")
def clustered_template(tmp_path_factory):
    return store_template(tmp_path_factory.mktemp("clustered"), build_clustered)


@pytest.fixture
def clustered(cache, clustered_template):
    """`build_clustered`'s store, this test's own copy: tests that change the image folder build their own."""
    return copy_store(clustered_template, cache)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models
    run about as fast, and far faster when other jobs share a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wait_until(predicate, timeout: float = 300, what: str = "the condition", poll: float = 0.2):
    """Poll `predicate()` until it returns something truthy and return that; fail the test, naming `what`,
    when `timeout` seconds pass first. Make the predicate decisive (true as soon as the outcome is known,
    e.g. "no longer queued") and assert on the value it returns."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


ROOT = Path(__file__).resolve().parents[1]


def run_page(path: str, **state):
    """Page `path` (relative to the repository root) run once, headless, through Streamlit's AppTest,
    with `state` set in its session first. Returns the AppTest to inspect, change and rerun."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / path), default_timeout=60)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


# -- end to end: the real Streamlit server and Debian's chromium driven by Playwright ----------
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
e2e_marks = [pytest.mark.e2e, pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium not installed")]


def embedded_demo(cache: Path, monkeypatch, limit: int = 100):
    """In `cache` (the store a test server will use): Fashion-MNIST, the first `limit` images of each
    split, scanned and embedded by a one-epoch default backbone. Returns (store, name, backbone id);
    the caller clears `store._stores` when it is done with the store."""
    from core.data import scan, sources
    from core.embed import embeddings
    from core.embed.backbones import DEFAULT_BACKBONE

    monkeypatch.setenv("REDEX_CACHE", str(cache))
    db._stores.clear()
    store = db.get_store()
    name = sources.register("fashion-mnist", limit=limit, store=store)
    scan.scan(name, store)
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=1, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    return store, name, bid


@pytest.fixture
def server(tmp_path):
    proc, url = start_server(tmp_path / "cache")
    yield url
    stop_server(proc)


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield pg
        browser.close()


def slide_left(page, slider, steps: int, until_metric: str) -> None:
    """Move a slider `steps` notches left with the keyboard, then wait until a metric shows `until_metric`."""
    slider.focus()
    for _ in range(steps):
        slider.press("ArrowLeft")
    page.wait_for_function(
        "text => [...document.querySelectorAll('[data-testid=stMetric]')].some(m => m.innerText.includes(text))",
        arg=until_metric, timeout=30_000)
