"""Words for people: plurals, plain names for internal ids, rates, durations and image formats.

Every page and the CLI say things through these helpers, so the same thing is said the same way
everywhere: "1 training run" / "2 training runs", "102 images/s", "about 3 min 10 s",
"28 × 28 px, grayscale", and "ResNet-8 (stride-2 stem), trained on fashion-mnist" where the store
says `trained:resnet8s2@fashion-mnist#1a2b3c4d`. Pure functions, no Streamlit, no store.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

# -- plurals -----------------------------------------------------------------------------------
_IRREGULAR = {"child": "children", "person": "people", "index": "indices", "matrix": "matrices"}


def plural_of(noun: str) -> str:
    """The plural of an English noun, or of the last word of a phrase ('training run' -> 'training runs')."""
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        word = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def plural(count: float, noun: str, plural_form: str | None = None) -> str:
    """'1 training run', '2 training runs', '1,234 images', '0 classes': the count (thousands separated)
    and the noun, plural unless the count is exactly 1. `plural_form` for nouns the rules miss."""
    n = f"{int(count):,}" if float(count).is_integer() else f"{count:,.2f}"
    return f"{n} {noun if count == 1 else plural_form or plural_of(noun)}"


# -- rates, durations --------------------------------------------------------------------------
def rate(per_second: float | None, unit: str = "images") -> str:
    """'102 images/s', '3.4 images/s', '12 images/min' (below 1/s); '' when there is none. `unit` is plural."""
    if not per_second or per_second <= 0:
        return ""
    if per_second >= 100:
        return f"{per_second:,.0f} {unit}/s"
    if per_second >= 1:
        return f"{per_second:.1f} {unit}/s".replace(".0 ", " ")
    per_minute = per_second * 60
    return f"{per_minute:.1f} {unit}/min".replace(".0 ", " ") if per_minute < 10 else f"{per_minute:.0f} {unit}/min"


def duration(seconds: float | None) -> str:
    """'45 s', '3 min 08 s', '1 h 20 min', '2 d 3 h'; '' for None."""
    if seconds is None:
        return ""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def duration_range(low: float, high: float) -> str:
    """'3-4 min', '1 h 20 min to 1 h 39 min', or one duration when both round alike."""
    a, b = duration(low), duration(high)
    if a == b:
        return a
    if low >= 60 and high < 3600 and round(low / 60) != round(high / 60):
        return f"{round(low / 60)}-{round(high / 60)} min"
    return f"{a} to {b}"


PROGRESS_UNITS = {"scan": "files", "sweep": "runs"}  # every other job counts images


def job_unit(job: dict) -> str:
    """What a job's progress counts (the plural noun after its rate): files, runs or images.

    Training phases report images processed (steps × batch), so every learning job reads in images/s."""
    return PROGRESS_UNITS.get(job.get("kind"), "images")


# -- image formats -----------------------------------------------------------------------------
_CHANNELS = {1: "grayscale", 3: "colour (RGB)", 4: "colour with transparency"}


def image_format(size: int | None, channels: int | None) -> str:
    """'28 × 28 px, grayscale', '64 × 64 px, colour (RGB)'."""
    if not size:
        return "not scanned yet"
    colour = _CHANNELS.get(int(channels or 0), f"{channels} channels")
    return f"{int(size)} × {int(size)} px, {colour}"


# -- plain names for internal ids --------------------------------------------------------------
PLAIN = {
    # how a group's kept image (its representative) is chosen
    "nearest_mean": "closest to the group's mean",
    "farthest_mean": "farthest from the group's mean",
    # subset methods
    "semantic": "semantic (one image per redundant group)",
    "random": "random",
    "full": "full set",
    # linkages
    "complete": "complete linkage (every pair close)",
    "average": "average linkage",
    "single": "single linkage (chains of close pairs)",
    # training recipes
    "sgd": "SGD with momentum",
    "adamw": "AdamW",
    "flip_crop": "flips and random crops",
}


def arch_name(arch: str) -> str:
    """'resnet8s2' -> 'ResNet-8 (stride-2 stem)', 'resnet20' -> 'ResNet-20', 'resnet8s2aa' -> 'ResNet-8
    (stride-2 stem, anti-aliased)'; other names unchanged."""
    m = re.fullmatch(r"resnet(\d+)(s2)?(aa)?", arch)
    if not m:
        return arch
    notes = [n for n, on in (("stride-2 stem", m.group(2)), ("anti-aliased", m.group(3))) if on]
    return f"ResNet-{m.group(1)}" + (f" ({', '.join(notes)})" if notes else "")


def plain(name: str | None) -> str:
    """Plain words for an internal name or id, for any page to show:

    - representative rules, methods and linkages ('nearest_mean' -> "closest to the group's mean");
    - backbone ids: 'trained:resnet8s2@fashion-mnist#1a2b3c4d' -> 'ResNet-8 (stride-2 stem), trained on
      fashion-mnist', 'timm:resnet18@64x3' -> 'resnet18 (pretrained, timm)';
    - LTRP model ids: 'ranker:…@fashion-mnist#…<mae:…' -> 'patch ranker trained on fashion-mnist',
      'mae:…@fashion-mnist#…' -> 'MAE trained on fashion-mnist', 'mae:file-…' -> 'MAE from a checkpoint file'.
    Anything else comes back as given. Two ids may read alike: `plain_labels` tells them apart."""
    if name is None:
        return ""
    name = str(name)
    if name in PLAIN:
        return PLAIN[name]
    kind, sep, rest = name.partition(":")
    if not sep:
        return arch_name(name)
    if kind == "trained":
        arch, _, tail = rest.partition("@")
        dataset = tail.rpartition("#")[0] or tail
        return f"{arch_name(arch)}, trained on {dataset}" if dataset else arch_name(arch)
    if kind == "timm":
        model, _, tail = rest.partition("@")
        source = "from a checkpoint file" if "#" in tail else "timm"
        return f"{model} (pretrained, {source})"
    if kind == "ranker":
        own = rest.partition("<")[0]
        dataset = own.partition("@")[2].rpartition("#")[0]
        return f"patch ranker trained on {dataset}" if dataset else "patch ranker"
    if kind == "mae":
        if rest.startswith("file-"):
            return "MAE from a checkpoint file"
        dataset = rest.partition("@")[2].rpartition("#")[0]
        return f"MAE trained on {dataset}" if dataset else "MAE"
    return name


def _variant(name: str) -> str:
    """The part of an id that tells apart two ids with the same plain words (a recipe or file digest)."""
    own = name.partition("<")[0]
    tag = own.rpartition("#")[2] if "#" in own else own.rpartition("-")[2]
    return tag[:8]


def plain_labels(names: Iterable[str]) -> dict[str, str]:
    """`plain` for each of `names`; ids that would read alike get their variant appended, e.g.
    'ResNet-8 (stride-2 stem), trained on fashion-mnist · variant 1a2b3c4d'. For select boxes
    (`format_func=labels.get`) and tables."""
    names = list(dict.fromkeys(str(n) for n in names))
    words = {n: plain(n) for n in names}
    clash = Counter(words.values())
    return {n: f"{w} · variant {_variant(n)}" if clash[w] > 1 else w for n, w in words.items()}


# -- jobs: what a kind does, and its parameters and result as key/value lines ------------------
JOB_KINDS = {
    "scan": "scan files",
    "embed": "embeddings",
    "project": "UMAP map",
    "cluster": "merge trees",
    "sweep": "training sweep",
    "train": "training run",
    "ltrp": "patch ranker",
    "ltrp_score": "patch scoring",
}


def job_kind(kind: str | None) -> str:
    """'cluster' -> 'merge trees', 'ltrp_score' -> 'patch scoring'; an unknown kind as given."""
    return JOB_KINDS.get(kind or "", kind or "")


# label of each key a job's parameters or result may hold; {unit} is what the job counts (files, runs or images)
_FIELD_LABELS = {
    "backbone": "backbone", "backbone_id": "backbone", "linkage": "linkage", "representative": "kept image",
    "ranker_id": "patch ranker", "mae_id": "MAE", "run_key": "run key", "sweep_id": "sweep",
    "epochs": "training epochs", "mae_epochs": "MAE training epochs", "ranker_epochs": "ranker training epochs",
    "mask_ratio": "pseudo-score mask ratio", "checkpoint": "checkpoint file", "retrain": "train again",
    "score": "score every image after training", "ray": "Ray cluster", "force": "train identical runs again",
    "images": "images", "decoded": "images decoded", "converted": "images converted (kept)",
    "skipped": "files skipped", "embedded": "images embedded", "total": "{unit} in all",
    "unreadable": "images that could not be read", "built": "merge trees built", "points": "points on the map",
    "classes": "classes", "runs": "runs trained", "done": "runs done", "failed": "runs failed",
    "cancelled": "runs cancelled", "reused": "{unit} reused (unchanged)", "scored": "images scored",
    "test_top1": "test top-1 accuracy", "seconds": "time", "fraction": "fraction kept", "seed": "seed",
    "method": "subset", "n_train": "training images",
}
_KIND_LABELS = {  # where a key means something else for one kind of job
    ("sweep", "runs"): "runs to train", ("sweep", "reused"): "identical finished runs reused",
    ("scan", "reused"): "files unchanged since the last scan",
    ("embed", "reused"): "images already embedded", ("ltrp_score", "reused"): "images already scored",
    ("cluster", "reused"): "merge trees reused", ("cluster", "images"): "train images clustered",
}
_ID_KEYS = {"backbone", "backbone_id", "linkage", "representative", "ranker_id", "mae_id", "method"}


def _field_value(key: str, value) -> str:
    if value is None:
        return "default"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "test_top1" and isinstance(value, (int, float)):
        return f"{100 * value:.2f} %"
    if key == "seconds" and isinstance(value, (int, float)):
        return duration(value)
    if key == "mask_ratio" and isinstance(value, (int, float)):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_field_value(k, v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(_field_value(key, v) for v in value) or "none"
    return plain(value) if key in _ID_KEYS else str(value)


def job_fields(kind: str | None, values: dict | None) -> list[tuple[str, str]]:
    """A job's parameters or result as (label, value) pairs in plain words and units, for a person:
    {'backbone_id': 'trained:resnet8s2@fm#1a2b3c4d', 'embedded': 70000} ->
    [('backbone', 'ResNet-8 (stride-2 stem), trained on fm'), ('images embedded', '70,000')];
    'test_top1' 0.912 -> '91.20 %', 'seconds' 190 -> '3 min 10 s', None -> 'default'. Unknown keys read
    with spaces for underscores. The raw JSON stays available to experts elsewhere."""
    unit = job_unit({"kind": kind})
    out = []
    for key, value in (values or {}).items():
        label = _FIELD_LABELS.get(key, key.replace("_", " ")).format(unit=unit)
        label = _KIND_LABELS.get((kind, key), label)
        out.append((label, _field_value(key, value)))
    return out
