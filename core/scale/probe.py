"""Ask a Ray cluster what it holds, in a process of its own: `python -m core.scale.probe ADDRESS`.

Prints one JSON line: {"ok": true, "ray": version, "nodes", "cpus", "gpus", "workers", "tree_tasks"} or
{"ok": false, "error": one line}. The app never joins a cluster itself: `core.scale.setting` runs this
with a timeout (a Ray driver cannot leave its cluster, and `ray.init` at a wrong address waits minutes).
"""
from __future__ import annotations

import json
import sys


def probe(address: str) -> dict:
    import ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes its one-line error
        return {"ok": False, "error": error_line(address, exc)}
    from core.scale import cluster, data

    try:
        resources = ray.cluster_resources()
        joined = cluster.Cluster(address, sum(1 for n in ray.nodes() if n.get("Alive")),
                                 float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))
        return {"ok": True, "ray": ray.__version__, "nodes": joined.nodes, "cpus": joined.cpus,
                "gpus": joined.gpus, "workers": data.pool_size(joined),
                "tree_tasks": cluster.capacity(joined, cluster.task_options(joined))}
    finally:
        ray.shutdown()


def error_line(address: str, exc: BaseException) -> str:
    """Ray's (multi-line) error at joining `address`, in one line that says what went wrong."""
    text = " ".join(str(exc).split())
    if "version mismatch" in text.lower():
        return f"version mismatch at {address}: {text.split(':', 1)[-1].strip()[:300]}"
    if address == "auto" and ("could not find" in text.lower() or "no running" in text.lower()):
        return "no Ray cluster runs on this machine ('auto' found none): start one with `ray start --head`"
    return f"cannot join the Ray cluster at {address}: {type(exc).__name__}: {text[:300]}"


def main(argv: list[str]) -> int:
    print(json.dumps(probe(argv[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
