"""Subset training: the evidence behind a subset (Birodkar et al. 2019, step 5 and Figure 2).

A classifier is trained from scratch on the full train split, on the semantic subset at fraction f
(one representative per redundant group, `core.redundancy.clusterings`), and on a random subset with the same
per-class counts k_c = max(1, round(f * n_c)) (the paper's baseline), and evaluated on the test
split (else val). Every run is a row of `train_runs`, keyed by everything that decides its result
(the training images' content ids and labels, the evaluation images, the recipe with its seed), so
an identical run is never trained twice unless asked, and results outlive restarts.

A sweep (fractions x methods x seeds) is a light scheduler job (`sweep`) that plans the runs, builds
the merge trees first if the semantic subset needs them, and launches one heavy `train` job per run,
as many at once as there are compute slots (`REDEX_MAX_JOBS`, default 1). A run that fails or whose
process is killed is marked failed and the sweep goes on with the next; `retry` starts a sweep of the
failed and cancelled runs. A `train` job recomputes its subset from the run's settings and checks it
against the planned fingerprint, so it can never silently train on other images.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core import estimates, jobs
from core.data.catalog import get_dataset, images_table
from core.redundancy.cuts import REPRESENTATIVES, groups_for_fraction
from core.store.db import Store, get_store, to_json

if TYPE_CHECKING:
    from core.training.recipe import Recipe


METHODS = ("semantic", "random")          # "full" is the run at fraction 1.0
DEFAULT_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.5)
DEFAULT_SEEDS = 3
BUDGET_RULES = ("epochs", "steps")        # same epochs as the full run, or the same optimisation steps
EVAL_SPLITS = ("test", "val")


# Seconds each run spends outside its training loop: process start, imports, data, evaluation
# (measured: 5-10 s on the 2-core CPU, 10-15 s for six runs sharing an H100 machine).
RUN_OVERHEAD_S = 10.0


class SubsetTrainingError(ValueError):
    """A sweep or run cannot be made as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Selection:
    """How the semantic subset is chosen (the trees of `core.redundancy.clusterings`)."""

    backbone_id: str
    linkage: str = "complete"
    representative: str = "nearest_mean"

    def __post_init__(self) -> None:
        if self.representative not in REPRESENTATIVES:
            raise SubsetTrainingError(f"representative must be one of {', '.join(REPRESENTATIVES)}")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep trains: every (fraction, method, seed), with one recipe (its seed set per run)."""

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    methods: tuple[str, ...] = METHODS
    seeds: int = DEFAULT_SEEDS
    recipe: dict = field(default_factory=dict)     # Recipe fields; empty: the dataset's default recipe
    budget: str = "epochs"
    selection: dict | None = None                   # Selection fields; None: newest backbone, complete
    force: bool = False                             # train again even when an identical run is done

    def __post_init__(self) -> None:
        if not self.fractions or any(not 0.0 < f <= 1.0 for f in self.fractions):
            raise SubsetTrainingError("fractions must lie in (0, 1]")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise SubsetTrainingError(f"methods must be among {', '.join(METHODS)}; got {list(self.methods)}")
        if not 1 <= self.seeds <= 100:
            raise SubsetTrainingError("seeds must be between 1 and 100")
        if self.budget not in BUDGET_RULES:
            raise SubsetTrainingError(f"budget must be one of {', '.join(BUDGET_RULES)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepSpec:
        data = dict(data)
        data["fractions"] = tuple(float(f) for f in data.get("fractions", DEFAULT_FRACTIONS))
        data["methods"] = tuple(data.get("methods", METHODS))
        return cls(**data)


@dataclass(frozen=True)
class RunPlan:
    """One planned run: which images it trains on, with which recipe, and its key."""

    run_key: str
    method: str              # full | semantic | random
    fraction: float
    seed: int
    selection: dict          # empty unless semantic
    recipe: Recipe
    subset_fp: str
    n_train: int


# -- the data of a run -------------------------------------------------------------------------
def eval_split(name: str, store: Store | None = None) -> str:
    """The split a run is evaluated on: test, else val. A subset run never evaluates on train images."""
    store = store or get_store()
    present = {s for (s,) in store.query("SELECT DISTINCT split FROM images WHERE dataset = ?", [name])}
    for split in EVAL_SPLITS:
        if split in present:
            return split
    raise SubsetTrainingError(
        f"{name!r} has no test or val images to evaluate on. Add a test/ (or val/) folder, or a split column"
        f" in the manifest: a held-out part of train would be clustered with the subset it is meant to judge")


def _train_pool(name: str, store: Store) -> pd.DataFrame:
    table = images_table(name, store, split="train")
    if table.empty:
        raise SubsetTrainingError(f"{name!r} has no train images")
    return table[["row", "path", "image_id", "label"]].reset_index(drop=True)


def subset_table(name: str, method: str, fraction: float, seed: int, selection: Selection | None = None, *,
                 store: Store | None = None, clustering=None) -> pd.DataFrame:
    """The train images (row, path, image_id, label) a run trains on, in row order.

    full: every train image. semantic: the representatives of the cut at `fraction` (`core.redundancy.clusterings`).
    random: per class (sorted labels), k_c = max(1, round(f * n_c)) images drawn with `seed`.
    """
    store = store or get_store()
    if method == "full" or fraction >= 1.0:
        return _train_pool(name, store)
    if method == "random":
        pool = _train_pool(name, store)
        rng = np.random.default_rng(seed)
        picks = []
        for label in sorted(pool.label.unique()):
            members = np.flatnonzero((pool.label == label).to_numpy())
            picks.append(rng.choice(members, groups_for_fraction(len(members), fraction), replace=False))
        return pool.iloc[np.sort(np.concatenate(picks))].reset_index(drop=True)
    if method != "semantic":
        raise SubsetTrainingError(f"unknown method {method!r}")
    from core.redundancy import clusterings

    if selection is None:
        raise SubsetTrainingError("a semantic subset needs a selection (backbone, linkage, representative)")
    c = clustering or clusterings.load_clustering(name, selection.backbone_id, selection.linkage, store)
    s = clusterings.subset(c, fraction=fraction, representative=selection.representative, seed=seed)
    kept = c.table.iloc[s.kept_indices]
    return kept.sort_values("row")[["row", "path", "image_id", "label"]].reset_index(drop=True)


def fingerprint(table: pd.DataFrame) -> str:
    """Of the images' content ids and labels, in row order: equal tables train the same run."""
    text = "\n".join(f"{i}\t{label}" for i, label in zip(table.image_id, table.label))
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _run_key(name: str, method: str, fraction: float, selection: dict, recipe: Recipe, subset_fp: str,
             eval_fp: str) -> str:
    ident = {"dataset": name, "method": method, "fraction": round(fraction, 6), "selection": selection,
             "recipe": recipe.to_dict(), "subset": subset_fp, "eval": eval_fp}
    return hashlib.blake2b(to_json(ident).encode(), digest_size=10).hexdigest()


def recipe_tag(recipe: dict) -> str:
    """Runs that differ only in their seed share a tag: their results are compared with each other."""
    rest = {k: v for k, v in recipe.items() if k != "seed"}
    return hashlib.blake2b(to_json(rest).encode(), digest_size=4).hexdigest()


def base_recipe(name: str, spec: SweepSpec, store: Store | None = None) -> Recipe:
    """The spec's recipe over the dataset's default one, with the budget rule applied (seed 0).

    budget 'steps': every run takes as many optimisation steps as the full run's epochs give.
    """
    from core.training.recipe import Recipe, default_recipe

    ds = get_dataset(name, store)
    recipe = default_recipe(ds["image_size"])
    try:
        recipe = Recipe.from_dict({**recipe.to_dict(), **(spec.recipe or {}), "budget": "epochs", "steps": None})
    except (TypeError, ValueError) as exc:
        raise SubsetTrainingError(f"bad recipe: {exc}") from None
    if spec.budget == "steps":
        n_full = len(_train_pool(name, store or get_store()))
        recipe = dataclasses.replace(recipe, budget="steps", steps=recipe.total_steps(n_full))
    return recipe


def resolve_selection(name: str, spec: SweepSpec, store: Store | None = None) -> Selection | None:
    """The spec's selection, or the newest backbone with embeddings; None when no method needs one."""
    if "semantic" not in spec.methods or all(f >= 1.0 for f in spec.fractions):
        return None
    if spec.selection and spec.selection.get("backbone_id"):
        return Selection(**spec.selection)
    from core.redundancy import clusterings

    try:
        bid = clusterings.default_backbone(name, store)
    except ValueError:
        raise SubsetTrainingError(f"the semantic subset needs embeddings of {name!r}: run `redex embed {name}`"
                                  f" (or Embed on the Datasets page) first") from None
    return Selection(bid, **{k: v for k, v in (spec.selection or {}).items() if k != "backbone_id"})


def plan_runs(name: str, spec: SweepSpec, store: Store | None = None, clustering=None) -> list[RunPlan]:
    """Every run of the sweep, in launch order (fractions as given, then methods, then seeds).

    Fraction 1.0 is one 'full' run per seed, whatever the methods. Needs up-to-date trees for
    semantic runs (`core.redundancy.clusterings.cluster`).
    """
    store = store or get_store()
    recipe = base_recipe(name, spec, store)
    selection = resolve_selection(name, spec, store)
    if selection is not None and clustering is None:
        from core.redundancy import clusterings

        clustering = clusterings.load_clustering(name, selection.backbone_id, selection.linkage, store)
    split = eval_split(name, store)
    eval_fp = fingerprint(images_table(name, store, split=split))
    plans, seen = [], set()
    for fraction in spec.fractions:
        methods = ("full",) if fraction >= 1.0 else spec.methods
        for method in methods:
            sel = dataclasses.asdict(selection) if method == "semantic" else {}
            for seed in range(spec.seeds):
                table = subset_table(name, method, fraction, seed, selection if sel else None, store=store,
                                     clustering=clustering)
                run_recipe = dataclasses.replace(recipe, seed=seed)
                fp = fingerprint(table)
                key = _run_key(name, method, fraction, sel, run_recipe, fp, eval_fp)
                if key not in seen:
                    seen.add(key)
                    plans.append(RunPlan(key, method, float(fraction), seed, sel, run_recipe, fp, len(table)))
    return plans


# -- estimates ---------------------------------------------------------------------------------
def training_speed(name: str, arch: str, store: Store | None = None):
    """This machine's training speed for `arch` on `name`'s image format, from its newest measurement
    (`core.estimates`: recorded by every backbone and subset training run here), carried over to the load
    now. Returns an `estimates.Estimate` of no images; its `rate` is None when nothing was measured yet:
    no speed is assumed."""
    ds = get_dataset(name, store)
    return estimates.estimate("train", estimates.training_key(arch, ds["image_size"], ds["channels"]), 0)


def estimate(name: str, spec: SweepSpec, store: Store | None = None) -> dict[str, Any]:
    """Runs, images to process and seconds a sweep will take before it starts (no trees needed).

    Counts come from k_c = max(1, round(f * n_c)), the same for both methods; runs already done
    (identical key) are not counted unless `spec.force` (only known once the sweep is planned, so
    here every run counts). Time: training images at the measured speed plus `RUN_OVERHEAD_S` a run,
    shared by the runs that go at once; None when this machine has not measured the recipe's
    architecture yet (`images_per_s` None too, and `speed_source` says so).
    """
    store = store or get_store()
    eval_split(name, store)  # a sweep with nothing to evaluate on is refused before any estimate
    recipe = base_recipe(name, spec, store)
    counts = _train_pool(name, store).label.value_counts().to_numpy()
    runs = images = 0
    for fraction in spec.fractions:
        n = int(sum(groups_for_fraction(int(c), fraction) for c in counts)) if fraction < 1.0 else int(counts.sum())
        n_methods = 1 if fraction >= 1.0 else len(spec.methods)
        steps = recipe.total_steps(n)
        runs += n_methods * spec.seeds
        images += n_methods * spec.seeds * steps * recipe.batch_for(n)
    speed = training_speed(name, recipe.arch, store)
    parallel = jobs.max_parallel()
    seconds = None if speed.rate is None else (images / speed.rate + runs * RUN_OVERHEAD_S) / min(parallel, max(runs, 1))
    return {"runs": runs, "images": images, "seconds": seconds,
            "images_per_s": speed.rate, "speed_source": speed.text(), "parallel": parallel}
