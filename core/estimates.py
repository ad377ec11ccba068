"""Time estimates from this machine's own measured speed, under its current load.

A job that learned or embedded images records its throughput when it finishes (`record`): what kind
of work ('train': a classifier or backbone learning; 'embed': computing embeddings), a key naming
what decides the speed (`speed_key`: architecture or backbone spec, image format, device), the
images per second, and the load average and threads it ran with. An estimate (`estimate`) takes the
newest measurement of that key and scales it to the load now, so a machine shared with other work
is not promised an idle machine's speed. Nothing is assumed: without a measurement an estimate says
"no measurement yet on this machine" and gives no time.

The load model (CPU only; a GPU's speed is taken as measured): a job with T threads, sharing the
machine's C cores with other runnable work of load O, gets min(1, C / (T + O)) of its threads' time.
The measurement's O is its 1-minute load average less its own T; the estimate's O is the load now.

Measurements live in `<cache>/speeds.json` (a handful per key, newest last), written under an flock:
they describe the machine, not a dataset, so they outlive a dataset's removal and a store repair.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass

from core import config, wording

KEEP = 5                 # measurements kept per key
MIN_SECONDS = 1.0        # shorter or smaller work measures start-up more than speed: not recorded
MIN_IMAGES = 2048


@dataclass(frozen=True)
class Speed:
    """One measurement: `rate` images/s over `seconds`, at 1-minute load `load` with `threads` threads
    on `cores` cores (device `device`), finished at `at` (Unix time)."""
    rate: float
    seconds: float
    load: float
    threads: int
    cores: int
    device: str
    at: float


@dataclass(frozen=True)
class Estimate:
    """`seconds` (None without a measurement), the speed expected now (`rate`, images/s), the
    measurement it comes from, and the load now."""
    seconds: float | None
    rate: float | None
    measured: Speed | None
    load_now: float

    def text(self) -> str:
        """Where the figure comes from, for the sentence after it, e.g. 'estimated from the last run on
        this machine: 1,020 images/s at load 1.9; 650 images/s expected at load 3.2 now'."""
        if self.measured is None:
            return "no measurement yet on this machine: the first run measures its speed"
        m = self.measured
        said = f"estimated from the last run on this machine: {wording.rate(m.rate)}"
        if m.device != "cpu":
            return f"{said} on {m.device}"
        return (f"{said} at load {m.load:.1f}; {wording.rate(self.rate)} expected at load {self.load_now:.1f}"
                f" now ({os.cpu_count()} cores)")


def _file():
    return config.cache_dir() / "speeds.json"


def speeds_version() -> tuple | None:
    """Changes whenever a speed is recorded (the file's size and modification time): a page keys its cached
    estimates on it, with the store's generation."""
    try:
        st = os.stat(_file())
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def _locked():
    """The measurements, read and written under an exclusive flock (jobs finish at the same time)."""
    path = _file()
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            data = {}  # a damaged file only costs the measurements
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


def device_type() -> str:
    from core.device import pick_device

    return pick_device().type


def speed_key(what: str, image_size: int, channels: int, device: str | None = None) -> str:
    """'resnet8s2@28x1@cpu': what decides a speed besides the load. `what`: an architecture (training)
    or a backbone spec such as 'trained:resnet8s2' (embedding)."""
    return f"{what}@{int(image_size)}x{int(channels)}@{device or device_type()}"


def load_now() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _threads() -> int:
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:
        return os.cpu_count() or 1


def record(kind: str, key: str, images: float, seconds: float, *, device: str | None = None) -> Speed | None:
    """Record that `images` images of `kind` work ('train' or 'embed') took `seconds` here, now.
    Short or small work (under `MIN_SECONDS` or `MIN_IMAGES`) is not recorded. Never raises: a lost measurement costs only an
    estimate."""
    if seconds < MIN_SECONDS or images < max(1, MIN_IMAGES):
        return None
    speed = Speed(rate=images / seconds, seconds=seconds, load=load_now(), threads=_threads(),
                  cores=os.cpu_count() or 1, device=device or key.rpartition("@")[2], at=time.time())
    try:
        with _locked() as data:
            rows = data.setdefault(f"{kind}|{key}", [])
            rows.append(asdict(speed))
            del rows[:-KEEP]
    except OSError:
        return None
    return speed


def measured(kind: str, key: str) -> Speed | None:
    """The newest measurement of (kind, key), or None."""
    path = _file()
    try:
        rows = json.loads(path.read_text()).get(f"{kind}|{key}") if path.exists() else None
    except (OSError, ValueError):
        return None
    return Speed(**rows[-1]) if rows else None


def share(threads: int, other_load: float, cores: int) -> float:
    """The part of its threads' time a job gets beside `other_load` runnable work: min(1, C / (T + O))."""
    return min(1.0, cores / max(1e-9, threads + max(0.0, other_load)))


def expected_rate(speed: Speed, load: float | None = None) -> float:
    """`speed`'s rate carried over to the load now (`load`, default the current 1-minute load)."""
    if speed.device != "cpu":
        return speed.rate
    load = load_now() if load is None else load
    cores = os.cpu_count() or speed.cores
    then = share(speed.threads, speed.load - speed.threads, speed.cores)
    now = share(speed.threads, load, cores)
    return speed.rate * now / then


def estimate(kind: str, key: str, images: float, *, overhead_s: float = 0.0, load: float | None = None) -> Estimate:
    """Seconds to process `images` images of `kind` work (plus `overhead_s`), from the newest measurement
    of `key` scaled to the load now; `seconds` is None without a measurement."""
    load = load_now() if load is None else load
    speed = measured(kind, key)
    if speed is None:
        return Estimate(None, None, None, load)
    rate = expected_rate(speed, load)
    return Estimate(images / rate + overhead_s, rate, speed, load)


def training_key(arch: str, image_size: int, channels: int) -> str:
    return speed_key(arch, image_size, channels)


def embedding_key(spec: str, image_size: int, channels: int) -> str:
    """For a backbone spec or id ('trained:resnet8s2', 'trained:resnet8s2@ds#tag'): the spec decides."""
    return speed_key(spec.partition("@")[0], image_size, channels)


# -- the estimates pages show ------------------------------------------------------------------
@dataclass(frozen=True)
class EmbedEstimate:
    """An embedding job before it starts: its two steps (training the backbone, unless a checkpoint of
    it exists or it is pretrained; embedding the images that have no embedding yet), each an `Estimate`
    or None when the step has nothing to do, and the images each processes."""
    train: Estimate | None
    train_images: int
    embed: Estimate | None
    embed_images: int

    @property
    def seconds(self) -> float | None:
        parts = [e for e in (self.train, self.embed) if e is not None]
        if not parts or any(e.seconds is None for e in parts):
            return None
        return sum(e.seconds for e in parts)

    def text(self) -> str:
        """One sentence for the page, e.g. 'About 6 min 10 s: training the backbone (600,000 images) ...'."""
        steps = []
        if self.train is not None:
            steps.append(("training the backbone", self.train_images, self.train))
        if self.embed is not None:
            steps.append(("embedding", self.embed_images, self.embed))
        if not steps:
            return "Every image already has an embedding with this backbone: nothing to compute."
        parts = [f"{what} ({wording.plural(n, 'image')} to process): "
                 + (f"about {wording.duration(e.seconds)}, {e.text()}" if e.seconds is not None else e.text())
                 for what, n, e in steps]
        head = f"About {wording.duration(self.seconds)} in all. " if self.seconds is not None and len(steps) > 1 else ""
        return head + "; ".join(p[0].upper() + p[1:] for p in parts) + "."


def embed_estimate(name: str, spec: str, epochs: int | None = None, store=None) -> EmbedEstimate:
    """What an `embed` job of `name` with backbone `spec` will do, and how long it should take here."""
    import dataclasses

    from core.data.catalog import content_count, get_dataset
    from core.embed import backbones, embeddings
    from core.store.db import get_store
    from core.training.recipe import default_recipe

    store = store or get_store()
    ds = get_dataset(name, store)
    size, channels = ds["image_size"], ds["channels"]
    parsed = backbones.parse_spec(spec)
    train = None
    n_train_images = 0
    if parsed.kind == "trained":
        recipe = dataclasses.replace(default_recipe(size), arch=parsed.name)
        if epochs:
            recipe = dataclasses.replace(recipe, epochs=int(epochs))
        bid = embeddings.backbone_id(name, spec, recipe=recipe.to_dict())
        if not config.model_file("backbones", bid).exists():
            n = embeddings.training_count(name, store, seed=recipe.seed)
            n_train_images = recipe.total_steps(n) * recipe.batch_for(n)
            train = estimate("train", training_key(parsed.name, size, channels), n_train_images)
        missing = len(embeddings.missing_rows(name, bid, store)) if not train else None
    else:
        missing = None
    if missing is None:  # a backbone still to train (or a pretrained one, keyed by its file): every image
        missing = content_count(name, store)
    embed = estimate("embed", embedding_key(spec, size, channels), missing) if missing else None
    return EmbedEstimate(train, n_train_images, embed, missing)
