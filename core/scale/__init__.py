"""Scale-out: the heavy stages on a Ray cluster instead of this machine (docs/scale-out.md).

A job's `ray` parameter (`--ray ADDRESS` on the heavy commands, else the app's setting, written there when
the job is launched: `core.scale.setting`) or `REDEX_RAY_ADDRESS=auto|HOST:PORT` sends to the cluster:

- embedding and LTRP scoring: Ray Data over the image list, CPU tasks that load each image (the pixel
  cache where the node sees it, else decode and resize the source file; for a pretrained backbone or a
  224-px MAE, the source file read at the model's own size, `FileSource`), an actor per GPU (CPU actors
  on a CPU-only cluster) that runs the model in batches (`core.scale.data`);
- the near-copy search by pixels: one task per class (`core.scale.copies`);
- merge trees: one task per class, and one per part of a big class's approximation (`cluster.map_*`);
- subset training runs: each run one task with its resources (`core.subsets.sweeps`).

The job process stays the driver and the only writer of the store: results come back to it and it
commits them chunk by chunk, keyed by content id as on the local path, so a retried task or a
resumed job never stores anything twice. Without an address nothing changes and nothing here imports
ray (`ray_address` reads only the environment and the job's parameters; `core.scale.setting` reads the
store and checks an address in a process of its own).
"""
from __future__ import annotations

import os

ENV = "REDEX_RAY_ADDRESS"
LOCAL = ("", "local", "off", "none")  # values that mean "run here"


def ray_address(params: dict | None = None) -> str | None:
    """The Ray cluster a job's heavy stages go to, or None to run them here.

    The job's `ray` parameter wins (so `--ray local` overrides the environment); else `REDEX_RAY_ADDRESS`.
    The app's setting reaches a job as its `ray` parameter (`core.scale.setting.for_launch`)."""
    value = (params or {}).get("ray")
    if value is None:
        value = os.environ.get(ENV, "")
    value = str(value).strip()
    return None if value.lower() in LOCAL else value


def check_address(value: str | None) -> str | None:
    """A `--ray` value as given, after checking that Ray is installed when it names a cluster (None: not given).
    Raises ValueError with what to do."""
    if value is None or value.strip().lower() in LOCAL:
        return value
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError(f"--ray {value}: Ray is not installed here; pip install 'redex[ray]' (or run without --ray)")
    return value.strip()


def where_text(ran_on: dict | None) -> str:
    """'local', or 'ray 10.0.0.5:6379 · 4 workers (3 nodes, 48 CPUs, 4 GPUs)' for the Jobs page and the CLI."""
    if not ran_on:
        return "local"
    text = f"ray {ran_on.get('address', '?')}"
    if ran_on.get("workers"):
        text += f" · {ran_on['workers']} worker{'s' if ran_on['workers'] != 1 else ''}"
    text += (f" ({ran_on.get('nodes', '?')} node{'s' if ran_on.get('nodes') != 1 else ''},"
             f" {ran_on.get('cpus', 0):g} CPUs, {ran_on.get('gpus', 0):g} GPUs)")
    return text
