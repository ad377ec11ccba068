"""A subset training run on a Ray cluster: one task with the run's resources, its progress streamed back.

The `train` job stays the run's driver: it plans nothing new, submits the task, relays the task's
progress to its own row (so the Training and Jobs pages and `redex follow` show it as for a local run),
and writes the metrics the task returns. A cancel of the job cancels the task (its worker is killed);
a worker that dies is replaced and the run started again by Ray (`max_retries`).
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from core.scale import cluster as ray_cluster
from core.scale.data import PixelSource

if TYPE_CHECKING:
    from core.jobs import JobContext

REPORT_EVERY_S = 1.0  # how often a worker sends its progress back


def run_options(joined: ray_cluster.Cluster) -> dict:
    """One GPU per run when the cluster has GPUs, else `REDEX_RAY_RUN_CPUS` CPUs (default 1)."""
    cpus = float(os.environ.get("REDEX_RAY_RUN_CPUS") or 1)
    return ray_cluster.task_options(joined, cpus=cpus, gpu=True)


def run_capacity(address: str) -> int:
    """How many runs the cluster at `address` trains at once (what a sweep keeps in flight)."""
    joined = ray_cluster.connect(address)
    return ray_cluster.capacity(joined, run_options(joined))


def train_remote(source: PixelSource, spec: str, train_rows: np.ndarray, train_paths: np.ndarray,
                 train_labels: np.ndarray, n_classes: int, recipe, eval_rows: np.ndarray, eval_paths: np.ndarray,
                 eval_labels: np.ndarray) -> Iterator[tuple]:
    """On a worker: ('progress', done, total, info) now and then, then ('done', metrics).

    `core.embed.backbones.train_backbone`, the call of the local path, runs in a thread so that its
    progress callback can be yielded back from this (streaming) task."""
    import torch

    from core.embed.backbones import train_backbone

    torch.set_num_threads(ray_cluster.torch_threads())
    images, held = source.read(train_rows, train_paths), source.read(eval_rows, eval_paths)
    events: queue.Queue = queue.Queue()
    out: dict = {}

    def work() -> None:
        try:
            out["metrics"] = train_backbone(spec, images, train_labels, n_classes, recipe=recipe, eval_images=held,
                                            eval_labels=eval_labels,
                                            progress=lambda *p: events.put(("progress", *p)))[1]
        except BaseException as exc:  # noqa: BLE001 - raised again below, in the task's own thread
            out["error"] = exc
        finally:
            events.put(None)

    threading.Thread(target=work, daemon=True).start()
    sent = 0.0
    while (event := events.get()) is not None:
        if time.monotonic() - sent >= REPORT_EVERY_S:
            sent = time.monotonic()
            yield event
    if "error" in out:
        raise out["error"]
    yield ("done", out["metrics"])


def train_on_cluster(address: str, source: PixelSource, spec: str, train: tuple[np.ndarray, np.ndarray, np.ndarray],
                     n_classes: int, recipe, held: tuple[np.ndarray, np.ndarray, np.ndarray],
                     progress: Callable | None, ctx: JobContext | None) -> dict:
    """Train one run on the cluster at `address`; `train` and `held` are (rows, paths, labels). Returns
    the metrics of `train_backbone`; `progress(done, total, info)` as on the local path."""
    import ray

    joined = ray_cluster.connect(address)
    options = run_options(joined)
    if ctx:
        ctx.ran_on(joined.ran_on(1))
        ctx.log(f"on Ray at {address}: one task with {options}")
    remote = ray.remote(train_remote).options(num_returns="streaming", **options)
    stream = remote.remote(source, spec, *train, n_classes, recipe, *held)
    try:
        while True:
            with ctx.interruptible() if ctx else contextlib.nullcontext():
                try:
                    event = ray.get(next(stream))
                except StopIteration:
                    break
            if event[0] == "done":
                return event[1]
            if progress is not None:
                progress(*event[1:])
    finally:
        ray.cancel(stream, force=True)
    raise RuntimeError("the training task ended without its metrics")

