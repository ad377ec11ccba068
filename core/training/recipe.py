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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field}={value!r}; choose one of {', '.join(choices)}")
