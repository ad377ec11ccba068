"""A training recipe: everything that decides a classifier run (saved beside its results)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# Registered name of the default architecture in `core.embed.backbones` (kept here so that a recipe
# needs no model import; `core.embed.backbones.DEFAULT_BACKBONE` is built from it).
DEFAULT_ARCH = "resnet8s2"
OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("none", "flip_crop")
BUDGETS = ("epochs", "steps")
CONTRASTIVE_FIELDS = ("contrastive", "temperature", "view_shift", "view_scale", "view_color")


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a training run; saved beside its results (`to_dict`)."""

    arch: str = DEFAULT_ARCH        # registered architecture name (provenance; see core.embed.backbones)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.1                 # peak learning rate of the one-cycle schedule
    optimizer: str = "sgd"          # 'sgd' (Nesterov momentum) | 'adamw'
    momentum: float = 0.9           # SGD momentum, AdamW beta1
    weight_decay: float = 5e-4      # on weights only, not on biases and norm parameters
    label_smoothing: float = 0.1
    augmentation: str = "none"      # 'none' | 'flip_crop' (random h-flip + random crop)
    crop_padding: int = 2           # pixels of zero padding around the random crop
    warmup_frac: float = 0.2        # share of the steps spent on the linear warm-up
    seed: int = 0
    budget: str = "epochs"          # 'epochs' | 'steps' (equal compute for subsets)
    steps: int | None = None        # total optimisation steps when budget == 'steps'
    # Backbones only (`core.embed.backbones.train_backbone`): the model sees two jittered views of each
    # image, cross-entropy on both, plus `contrastive` x NT-Xent between the views' embeddings, so an
    # image and its near copies (a pixel or two moved, slightly rescaled) embed close together.
    contrastive: float = 0.0        # weight of the NT-Xent term; 0: cross-entropy on the plain images only
    temperature: float = 0.1        # NT-Xent temperature
    view_shift: float = 2.0         # each view is moved by up to this many pixels ...
    view_scale: float = 0.1         # ... and rescaled by a factor in 1 +- view_scale (half of the views:
                                    # whole-pixel moves only, no rescale) ...
    view_color: float = 0.15        # ... brightness x (1 +- view_color), noise sigma up to 32 view_color

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        _check_choice("budget", self.budget, BUDGETS)
        if self.budget == "steps" and not (self.steps and self.steps > 0):
            raise ValueError("budget='steps' needs steps > 0")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError("warmup_frac must lie in [0, 1)")
        if self.contrastive < 0 or self.temperature <= 0 or self.view_shift < 0 or not 0.0 <= self.view_scale < 0.5 \
                or not 0.0 <= self.view_color < 1.0:
            raise ValueError("need contrastive >= 0, temperature > 0, view_shift >= 0, view_scale in [0, 0.5)"
                             " and view_color in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """All fields, except the backbone-only ones while contrastive training is off: recipes from
        before they existed keep their dicts, and so their cache keys and run keys."""
        data = dataclasses.asdict(self)
        if not self.contrastive:
            for name in CONTRASTIVE_FIELDS:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown recipe fields: {sorted(unknown)}")
        return cls(**data)

    def batch_for(self, n_train: int) -> int:
        """Batch size used on `n_train` images (never larger than the set)."""
        return min(self.batch_size, n_train)

    def total_steps(self, n_train: int) -> int:
        """Optimisation steps of the run; each epoch drops its last incomplete batch."""
        if self.budget == "steps":
            return int(self.steps)
        return self.epochs * (n_train // self.batch_for(n_train))


def default_recipe(image_size: int = 28, arch: str = DEFAULT_ARCH) -> Recipe:
    """The recipe tuned for 28-32 px images on a CPU budget (bench/embed.py has the evidence).

    Fashion-MNIST, resnet8s2, 10 epochs: 91.1-91.4 % test top-1. No augmentation: a 10-epoch
    run underfits, and flip+crop (pad 2) cost 1.3 points, flip alone 0.6; switch
    'flip_crop' on for longer runs (its padding scales with `image_size`).
    """
    return Recipe(arch=arch, epochs=10, augmentation="none", crop_padding=max(1, round(image_size / 14)))


def backbone_recipe(image_size: int = 28, arch: str = DEFAULT_ARCH) -> Recipe:
    """The recipe of `trained:` embedding backbones: `default_recipe` plus the contrastive views.

    Cross-entropy alone embeds an image moved by one pixel farther from it than most other images of
    its class (planted-copy benchmark, `bench/cluster.py --near-copies`: 2-4 % of 1-2 px shifts grouped
    with their original at fraction 0.9, with or without flip+crop augmentation or anti-aliased
    downsampling); the NT-Xent term on jittered views brings that to ~100 % (docs/benchmarks.md).
    The views move by up to `image_size / 14` px (2 at 28 px).
    """
    return dataclasses.replace(default_recipe(image_size, arch), contrastive=3.0, temperature=0.05,
                               view_shift=float(max(1, round(image_size / 14))), view_scale=0.1)


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r}; choose one of {', '.join(choices)}")
