"""Pretrained timm backbones behave like timm (issue 13): the default pretrained tag comes from the Hugging
Face cache (no network when it is there), is downloaded into it over the Hub protocol otherwise, and
HF_HUB_OFFLINE=1 or a machine without a network is told before any job starts, at once, with the command
that fetches the weights. A pretrained backbone reads each image at its pretrained config from the source
file (or, for Fashion-MNIST, the pixel cache at native size); an unreadable image is a problem, not an abort.

Real components throughout: timm's tiny `test_resnet` (470k parameters) with its real `pretrained=True`
loading, huggingface_hub against a real cache folder and a real HTTP server speaking the Hub's resolve
protocol on 127.0.0.1, a real DuckDB store, real PNG/JPEG files."""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from core import jobs
from core.data import catalog, scan, sources
from core.data.decode import open_image
from core.embed import embeddings, timm_models
from core.embed.timm_models import BackboneUnavailable
from tests.conftest import run_page

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "test_resnet"                 # timm's tiny test model; default tag r160_in1k, 160 px, bilinear, crop 0.95
REPO = "timm/test_resnet.r160_in1k"
REV = "0123456789abcdef0123456789abcdef01234567"
FETCH = f"timm.create_model('{NAME}', pretrained=True)"


# -- fixtures: an HF cache of our own, weights in it, a Hub on 127.0.0.1 -----------------------
@pytest.fixture
def hf(tmp_path, monkeypatch):
    """An empty HF cache and HF_HUB_OFFLINE=1 for this process (what huggingface_hub reads from the
    environment at import) and its children; an empty torch hub cache."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    return hub


def weights_of(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    import timm

    return timm.create_model(NAME, pretrained=False).state_dict()


@pytest.fixture
def cached(hf):
    """test_resnet's default tag in the HF cache, laid out as huggingface_hub writes it."""
    from safetensors.torch import save_file

    state = weights_of(1)
    repo = hf / ("models--" + REPO.replace("/", "--"))
    (repo / "snapshots" / REV).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / REV / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return state


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def endpoint(monkeypatch):
    """Point huggingface_hub at another endpoint, as HF_ENDPOINT does at import."""
    from huggingface_hub import constants

    def use(url: str) -> None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    return use


def assert_same_weights(model, state: dict[str, torch.Tensor]) -> None:
    body = model.model.state_dict()
    assert body and all(torch.equal(v, state[k]) for k, v in body.items())


# -- datasets ----------------------------------------------------------------------------------
def photo(rng, w: int, h: int) -> Image.Image:
    """A smooth colour image w x h (gradients and a disc), so resizing and cropping change it."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    cx, cy = rng.uniform(0.3, 0.7, 2)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < 0.05)
    arr = np.stack([x * 255, y * 255, disc * 255 * rng.uniform(0.5, 1)], -1)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


@pytest.fixture
def photos(store, tmp_path):
    """A scanned folder of 8 RGB images of several sizes, all larger than the 64 px working size."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    sizes = [(120, 90), (200, 150), (90, 160), (100, 100), (256, 180), (75, 130), (140, 140), (96, 72)]
    for i, (w, h) in enumerate(sizes):
        split, cls = ("train" if i < 6 else "test"), "ab"[i % 2]
        path = root / split / cls / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(rng, w, h).save(path)
    name = sources.register(str(root), "photos", store=store)
    scan.scan(name, store)
    assert catalog.get_dataset(name, store)["image_size"] == 64
    return name, root


def by_path(name: str, bid: str, store) -> dict[str, np.ndarray]:
    table, vecs = embeddings.load_embeddings(name, bid, store)
    return dict(zip(table.path, vecs))


def features(model, image: Image.Image) -> np.ndarray:
    with torch.inference_mode():
        return model.features(model.transform(image.convert("RGB"))[None]).numpy()[0]


# -- the tests ---------------------------------------------------------------------------------
def test_offline_and_uncached_is_refused_by_the_cli_before_a_job(store, photos, hf, capsys):
    # HF_HUB_OFFLINE=1 and a fresh HF cache. Before: no check, the job started and failed later, and the
    # message did not say how to fetch the weights.
    from core.cli import main

    name, _ = photos
    timm_models.check_timm_name(NAME)  # timm imported: what follows is the check alone
    start = time.monotonic()
    assert main(["embed", name, "--backbone", f"timm:{NAME}"]) == 1
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    line = lines[0]
    assert FETCH in line and "HF_HUB_OFFLINE=1" in line and "--checkpoint PATH" in line
    assert f"HF cache ({hf})" in line and "models--timm--test_resnet.r160_in1k" in line
    assert not jobs.list_jobs(store)


def test_no_network_fails_fast_before_and_inside_a_job(store, photos, hf, endpoint, monkeypatch):
    # No HF_HUB_OFFLINE, no weights cached, and the Hub does not answer: refused (connection refused),
    # or after the short probe timeout (a server that accepts and never replies), never after
    # huggingface_hub's 5 retries with backoff (about 25 s per file, two files).
    name, _ = photos
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    endpoint(f"http://127.0.0.1:{port}")
    timm_models.check_timm_name(NAME)  # timm imported: what follows is the check alone
    start = time.monotonic()
    with pytest.raises(BackboneUnavailable, match="cannot be reached") as err:
        embeddings.check_embed_params(name, {"backbone": f"timm:{NAME}"})
    assert FETCH in str(err.value) and time.monotonic() - start < 5
    with pytest.raises(BackboneUnavailable, match="cannot be reached"):  # the job's own load, as fast
        timm_models.load_timm(NAME)
    assert time.monotonic() - start < 10

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever answers
    try:
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
        endpoint(f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(BackboneUnavailable, match="cannot be reached"):
            embeddings.check_embed_params(name, {"backbone": f"timm:{NAME}"})
        assert time.monotonic() - start < 5
    finally:
        silent.close()
    # A model with no pretrained weights at all is refused with that reason, network or not.
    with pytest.raises(BackboneUnavailable, match="timm has no pretrained weights for 'botnet50ts_256'"):
        embeddings.check_embed_params(name, {"backbone": "timm:botnet50ts_256"})
    with pytest.raises(BackboneUnavailable, match="no pretrained weights"):
        timm_models.load_timm("botnet50ts_256")
    with pytest.raises(ValueError, match="no pretrained tag 'bogus' for 'resnet18'; its tags: a1_in1k"):
        embeddings.check_embed_params(name, {"backbone": "timm:resnet18.bogus"})


def test_download_over_the_hub_protocol_then_the_cache_offline(hf, endpoint, monkeypatch):
    # The online path: timm's own pretrained=True, through huggingface_hub, from a server that speaks the
    # Hub's resolve protocol; the file lands in the HF cache layout, and then loads with the Hub gone.
    from safetensors.torch import save

    served = weights_of(2)
    data = save(served)
    wanted = f"/{REPO}/resolve/main/model.safetensors"
    hits = []

    class Hub(BaseHTTPRequestHandler):
        def head(self) -> bool:
            hits.append((self.command, self.path))
            found = self.path == wanted
            self.send_response(200 if found else 404)
            if found:
                self.send_header("X-Repo-Commit", REV)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            else:
                self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", str(len(data) if found else 0))
            self.end_headers()
            return found

        def do_HEAD(self):
            self.head()

        def do_GET(self):
            if self.head():
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server, url = serve(Hub)
    try:
        endpoint(url)
        weights = timm_models.check_available(NAME)
        assert weights.path is None and "will be downloaded" in weights.reason
        logged = []
        model = timm_models.load_timm(NAME, log=logged.append)
    finally:
        server.shutdown()
    assert ("GET", wanted) in hits and "downloading" in logged[0]
    assert_same_weights(model, served)
    assert model.weights == f"{REPO}@{REV}"
    assert (hf / "models--timm--test_resnet.r160_in1k" / "snapshots" / REV / "model.safetensors").is_file()
    monkeypatch.setattr(__import__("huggingface_hub").constants, "HF_HUB_OFFLINE", True)
    again = timm_models.load_timm(NAME)  # the Hub is gone and offline is on: the cache serves it
    assert_same_weights(again, served)
    assert "HF cache" in timm_models.check_available(NAME).reason


def test_cached_weights_embed_source_files_at_the_pretrained_config(store, photos, cached, tmp_path):
    # Before: the 64 px working-size pixel cache, upsampled to 160 (and weights only by hand).
    name, root = photos
    broken = root / "train" / "b" / "1.png"
    good_bytes = broken.read_bytes()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)  # damaged after the scan
    params = embeddings.check_embed_params(name, {"backbone": f"timm:{NAME}"})  # cached: passes offline
    model, bid = embeddings.ensure_backbone(name, params["backbone"], store=store)
    assert_same_weights(model, cached)
    assert bid.startswith(f"timm:{NAME}@files-160px.") and "#" not in bid
    result = embeddings.embed_dataset(name, model, bid, store=store, num_workers=1)  # a decode worker process
    assert (result["embedded"], result["unreadable"], result["total"]) == (7, 1, 8)
    problems = catalog.problems_table(name, store)
    row = problems[problems.severity == embeddings.NOT_EMBEDDED]
    assert list(row.path) == ["train/b/1.png"] and "truncated or corrupt" in row.reason.iloc[0]

    stored = by_path(name, bid, store)
    table = catalog.images_table(name, store)
    pixels = catalog.load_pixels(name, store)
    for path, vec in stored.items():
        np.testing.assert_allclose(vec, features(model, open_image(root / path, model.decode_side)), atol=1e-4,
                                   rtol=1e-4)
        row_px = pixels[int(table[table.path == path].row.iloc[0])]
        with torch.inference_mode():
            old = model.forward_features(torch.from_numpy(np.array(row_px)).permute(2, 0, 1)[None]).numpy()[0]
        assert not np.allclose(vec, old, atol=1e-3)  # the old way (64 px cache, upsampled) differs

    broken.write_bytes(good_bytes)  # repaired: the next run embeds it and the problem goes away
    again = embeddings.embed_dataset(name, model, bid, store=store, num_workers=0)
    assert (again["embedded"], again["reused"], again["unreadable"]) == (1, 7, 0)
    assert not (catalog.problems_table(name, store).severity == embeddings.NOT_EMBEDDED).any()

    # --checkpoint keeps working, with an id of its own.
    ckpt = tmp_path / "weights.pth"
    torch.save(cached, ckpt)
    from_file, file_bid = embeddings.ensure_backbone(
        name, f"timm:{NAME}", checkpoint=embeddings.check_embed_params(
            name, {"backbone": f"timm:{NAME}", "checkpoint": str(ckpt)})["checkpoint"], store=store)
    assert_same_weights(from_file, cached)
    assert "#" in file_bid and file_bid != bid


def test_fashion_mnist_reads_the_pixel_cache_at_native_size(store, cached):
    name = sources.register("fashion-mnist", limit=4, store=store)
    scan.scan(name, store)
    model, bid = embeddings.ensure_backbone(name, f"timm:{NAME}", store=store)
    assert bid.startswith(f"timm:{NAME}@px28x1-160px.")
    result = embeddings.embed_dataset(name, model, bid, store=store, num_workers=0)
    assert (result["embedded"], result["unreadable"]) == (8, 0)
    table, vecs = embeddings.load_embeddings(name, bid, store)
    pixels = catalog.load_pixels(name, store)
    want = np.stack([features(model, Image.fromarray(np.array(pixels[r])[..., 0])) for r in table.row])
    np.testing.assert_allclose(vecs, want, atol=1e-4, rtol=1e-4)


def test_datasets_page_offers_what_can_run_and_says_why_not(store, photos, cached):
    import streamlit as st

    name, _ = photos
    st.cache_data.clear()  # the page keeps its choices for 2 minutes
    at = run_page("pages/datasets.py", dataset=name)
    assert not at.exception
    picker = next(s for s in at.selectbox if s.label == "Backbone")
    assert picker.options[0].endswith("(trained:resnet8s2)")  # plain words first, the spec in brackets
    assert any("weights in the HF cache" in o and o.endswith(f"(timm:{NAME})") for o in picker.options)
    assert not any(o.endswith("(timm:resnet18)") for o in picker.options)
    said = " ".join(c.value for c in at.caption)
    assert "timm:resnet18" in said.replace("\\", "") and "HF_HUB_OFFLINE=1" in said.replace("\\", "")
    assert "create_model('resnet18', pretrained=True)" in said.replace("\\", "")
    # A model typed in that cannot run is refused at the button, before a job exists.
    next(t for t in at.text_input if t.label.startswith("Other backbone")).set_value("timm:resnet50")
    next(b for b in at.button if b.label == "Embed all images").click()
    at.run()
    assert at.error and "create_model" in at.error[0].value.replace("\\", "")
    assert not [j for j in jobs.list_jobs(store) if j["kind"] == "embed"]
    # The cached one starts a job (before: no picker, and the job failed for want of weights).
    picker = next(s for s in at.selectbox if s.label == "Backbone")
    picker.set_value(f"timm:{NAME}")
    next(t for t in at.text_input if t.label.startswith("Other backbone")).set_value("")
    next(b for b in at.button if b.label == "Embed all images").click()
    at.run()
    embeds = [j for j in jobs.list_jobs(store) if j["kind"] == "embed"]
    assert len(embeds) == 1 and embeds[0]["params"]["backbone"] == f"timm:{NAME}"
    jobs.cancel(embeds[0]["id"], store)  # what the job does is the test above; it need not run here
