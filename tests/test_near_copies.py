"""Near copies group with their original (issue 13): a real dataset with planted one-pixel shifts goes
through scan, the default backbone, the merge trees and a cut at fraction 0.9, as a user's would.

Measured here (one thread): the contrastive backbone recipe groups 34 of 40 shifts with their original;
the cross-entropy-only recipe before it, 1 of 40. The issue's target, 95 %, is not met yet: the bar
below guards the gain (docs/benchmarks.md, "Near copies")."""
from __future__ import annotations

import numpy as np
import pytest

from core.data import scan, sources
from core.embed import embeddings
from core.embed.backbones import DEFAULT_BACKBONE
from core.redundancy import clusterings
from tests.conftest import png_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = (0, 1, 7, 8)     # t-shirt, trouser, sneaker, bag
PER_CLASS = 150            # train originals per class
COPIES = 10                # planted one-pixel shifts per class
EPOCHS = 40                # 80 steps on these 640 images (the default 10 epochs would be 20)
GROUPED_AT_LEAST = 0.75    # share of the shifts in their original's group (measured 0.85; before: 0.025)
DIRECTIONS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """uint8 [H, W] moved by (dy, dx) pixels, zero fill."""
    h, w = image.shape
    out = np.zeros_like(image)
    out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = image[max(0, -dy):h + min(0, -dy),
                                                                      max(0, -dx):w + min(0, -dx)]
    return out


def test_one_pixel_shifts_mostly_share_their_originals_group_at_fraction_0_9(store, tmp_path, fmnist_test):
    images, labels = fmnist_test
    root = tmp_path / "shifted"
    pairs = []  # (original path, copy path), relative to root
    for cls in CLASSES:
        idx = np.flatnonzero(labels == cls)
        for split, rows in (("train", idx[:PER_CLASS]), ("test", idx[PER_CLASS:PER_CLASS + 20])):
            (root / split / f"c{cls}").mkdir(parents=True)
            for i in rows:
                (root / split / f"c{cls}" / f"{i:05d}.png").write_bytes(png_bytes(images[i]))
        for j, i in enumerate(idx[:COPIES * 3:3]):
            original, copy = f"train/c{cls}/{i:05d}.png", f"train/c{cls}/{i:05d}-moved.png"
            (root / copy).write_bytes(png_bytes(shift(images[i], *DIRECTIONS[j % 8])))
            pairs.append((original, copy))
    name = sources.register(str(root), "shifted")
    scan.scan(name, store)
    model, bid = embeddings.ensure_backbone(name, DEFAULT_BACKBONE, epochs=EPOCHS, store=store)
    embeddings.embed_dataset(name, model, bid, store=store)
    clusterings.cluster(name, bid, store=store)
    c = clusterings.load_clustering(name, bid, store=store)
    frame = clusterings.subset_frame(c, clusterings.subset(c, fraction=0.9))
    group = dict(zip(frame.path.map(lambda p: p.replace("\\", "/")), frame.group))
    group = {path.split("shifted/", 1)[-1]: g for path, g in group.items()}
    together = [group[a] == group[b] for a, b in pairs]
    assert len(pairs) == len(CLASSES) * COPIES and frame.kept.sum() == sum(round(0.9 * (PER_CLASS + COPIES))
                                                                          for _ in CLASSES)
    assert np.mean(together) >= GROUPED_AT_LEAST, \
        f"{sum(together)} of {len(pairs)} one-pixel shifts grouped with their original"


def test_the_contrastive_backbone_gets_its_own_cache_key_and_old_recipes_keep_theirs():
    from core.training.recipe import (
        CONTRASTIVE_FIELDS,
        Recipe,
        backbone_recipe,
        default_recipe,
    )

    plain, backbone = default_recipe(28), backbone_recipe(28)
    assert not set(CONTRASTIVE_FIELDS) & set(plain.to_dict())  # subset runs' keys are as before
    assert backbone.contrastive > 0 and Recipe.from_dict(backbone.to_dict()) == backbone
    ids = {embeddings.backbone_id("demo", DEFAULT_BACKBONE, recipe=r.to_dict()) for r in (plain, backbone)}
    assert len(ids) == 2  # embeddings of the cross-entropy-only backbone are never mixed with the new ones
