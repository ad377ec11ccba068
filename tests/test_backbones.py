"""Backbones and the trainer on real Fashion-MNIST images: shapes, determinism, learning, checkpoints."""
from __future__ import annotations

import dataclasses
import pickle
import time

import numpy as np
import pytest
import torch

from core import config
from core.data import idx
from core.embed import backbones, timm_models
from core.embed.timm_models import BackboneUnavailable
from core.training import classifier, loop
from core.training import recipe as training_recipe

SPEC = backbones.DEFAULT_BACKBONE
ARCH = backbones.parse_spec(SPEC).name
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny batches: no stall when other jobs share the CPU


@pytest.fixture(scope="module")
def fmnist() -> tuple[np.ndarray, np.ndarray]:
    """The first 1,200 training images `[N, 28, 28, 1]` uint8 and labels."""
    images, labels = idx.load_fashion_mnist(config.fashion_mnist_dir(), "train")
    return images[:1200, :, :, None], labels[:1200]


def quick_recipe(**overrides) -> training_recipe.Recipe:
    base = training_recipe.default_recipe(28, arch=ARCH)
    return dataclasses.replace(base, **{"epochs": 1, "batch_size": 32, "augmentation": "none", **overrides})


def embed_all(model, images, batch_size=128) -> np.ndarray:
    batches = backbones.embed_batches(model, images, batch_size=batch_size, device="cpu")
    return np.concatenate([feats for _, _, feats in batches])


@pytest.fixture(scope="module")
def trained(fmnist):
    """The default backbone after 4 short epochs on 1,000 images, evaluated on the next 200."""
    images, labels = fmnist
    return backbones.train_backbone(
        SPEC, images[:1000], labels[:1000], 10, recipe=quick_recipe(epochs=4),
        eval_images=images[1000:], eval_labels=labels[1000:], device="cpu",
    )


def test_training_learns_well_above_chance(trained):
    _, metrics = trained
    assert metrics["test_top1"] > 0.6  # chance is 0.1
    assert len(metrics["per_class"]) == 10
    assert metrics["train_loss"] < 2.0
    assert metrics["recipe"]["arch"] == ARCH


def test_embedding_shape_dtype_and_resume_offsets(trained, fmnist):
    model, _ = trained
    images = fmnist[0][:300]
    batches = list(backbones.embed_batches(model, images, batch_size=128, device="cpu"))
    assert [(lo, hi) for lo, hi, _ in batches] == [(0, 128), (128, 256), (256, 300)]
    feats = np.concatenate([f for _, _, f in batches])
    assert feats.shape == (300, 64) == (300, model.embed_dim)
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
    resumed = list(backbones.embed_batches(model, images, batch_size=128, device="cpu", start=256))
    assert [(lo, hi) for lo, hi, _ in resumed] == [(256, 300)]
    np.testing.assert_array_equal(resumed[0][2], feats[256:])


def test_embedding_does_not_leak_no_grad_into_the_caller(trained, fmnist):
    batches = backbones.embed_batches(trained[0], fmnist[0][:300], batch_size=128, device="cpu")
    next(batches)  # suspended between two batches
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_embedding_is_deterministic(trained, fmnist):
    model, _ = trained
    images = fmnist[0][:256]
    np.testing.assert_array_equal(embed_all(model, images), embed_all(model, images))


def test_same_seed_same_model(fmnist):
    images, labels = fmnist[0][:256], fmnist[1][:256]
    runs = [backbones.train_backbone(SPEC, images, labels, 10, recipe=quick_recipe(seed=seed), device="cpu")
            for seed in (3, 3, 4)]
    feats = [embed_all(model, images[:64]) for model, _ in runs]
    np.testing.assert_array_equal(feats[0], feats[1])
    assert not np.array_equal(feats[0], feats[2])


def test_normalisation_is_fitted_to_training_images(trained, fmnist):
    model, _ = trained
    pixels = fmnist[0][:1000].astype(np.float64) / 255.0
    assert model.mean.item() == pytest.approx(pixels.mean(), abs=1e-5)
    assert model.std.item() == pytest.approx(pixels.std(), abs=1e-5)


def test_checkpoint_round_trip_identical_features(trained, fmnist, tmp_path):
    model, metrics = trained
    path = tmp_path / "backbone.pt"
    backbones.save_checkpoint(model, path, {"test_top1": metrics["test_top1"], "dataset": "fmnist"})
    loaded, meta = backbones.load_checkpoint(path)
    assert meta == {"test_top1": metrics["test_top1"], "dataset": "fmnist"}
    assert loaded.build_args == model.build_args
    images = fmnist[0][:200]
    np.testing.assert_array_equal(embed_all(loaded, images), embed_all(model, images))


class _Payload:
    """An arbitrary pickled object: `weights_only` loading must refuse it."""


def test_checkpoint_loading_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": backbones.CHECKPOINT_FORMAT, "meta": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        backbones.load_checkpoint(path)


def test_save_rejects_meta_that_would_not_load(trained, tmp_path):
    model, _ = trained
    with pytest.raises(TypeError):
        backbones.save_checkpoint(model, tmp_path / "x.pt", {"when": object()})
    assert not (tmp_path / "x.pt").exists()


def test_three_channel_generated_images_train_and_embed():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 128)
    images = rng.integers(0, 60, (128, 32, 32, 3), dtype=np.uint8)
    images[labels == 1, :, :, 0] += 150  # class 1: red
    model, metrics = backbones.train_backbone(
        SPEC, images, labels, 2, recipe=quick_recipe(epochs=4, augmentation="flip_crop"), eval_images=images,
        eval_labels=labels, device="cpu",
    )
    assert model.build_args.in_chans == 3 and model.mean.shape == (1, 3, 1, 1)
    assert metrics["test_top1"] > 0.9
    assert embed_all(model, images).shape == (128, 64)


def test_steps_budget_runs_exactly_that_many_steps(fmnist):
    images, labels = fmnist[0][:200], fmnist[1][:200]
    calls = []
    recipe = quick_recipe(budget="steps", steps=7, batch_size=64)  # 3 steps/epoch -> 3 epochs
    _, metrics = backbones.train_backbone(SPEC, images, labels, 10, recipe=recipe, device="cpu",
                                          progress=lambda done, total, info: calls.append((done, total, info)))
    assert metrics["steps"] == 7
    assert calls[-1][:2] == (7, 7) and calls[-1][2]["epoch"] == 2
    assert all(total == 7 for _, total, _ in calls)


def test_should_stop_cancels(fmnist):
    images, labels = fmnist
    polls = []

    def stop() -> bool:
        polls.append(1)
        return True

    with pytest.raises(loop.TrainingCancelled):
        backbones.train_backbone(SPEC, images, labels, 10, recipe=quick_recipe(epochs=50), device="cpu",
                                 should_stop=stop)
    assert len(polls) == 1


def test_recipe_round_trips_through_json_dict():
    recipe = quick_recipe(optimizer="adamw", lr=1e-3, budget="steps", steps=100)
    assert training_recipe.Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="augmentation"):
        quick_recipe(augmentation="mixup")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        training_recipe.Recipe.from_dict({**recipe.to_dict(), "lr_typo": 1})


def test_flip_crop_keeps_pixels_and_shifts_within_padding():
    x = torch.arange(4 * 6 * 6, dtype=torch.uint8).view(4, 1, 6, 6) + 1
    out = classifier.flip_crop(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)
    for src, dst in zip(x, out):
        inner = dst[0, 1:-1, 1:-1]  # always inside the source image with padding 1
        assert set(inner.flatten().tolist()) <= set(src.flatten().tolist())


def test_spec_parsing():
    assert backbones.parse_spec("trained:resnet8") == backbones.BackboneSpec("trained", "resnet8")
    assert str(backbones.parse_spec("timm:resnet18")) == "timm:resnet18"
    assert backbones.parse_spec(backbones.DEFAULT_BACKBONE).kind == "trained"
    with pytest.raises(ValueError, match="resnet8"):
        backbones.parse_spec("trained:resnet9000")
    with pytest.raises(ValueError, match="trained, timm"):
        backbones.parse_spec("keras:resnet8")
    with pytest.raises(ValueError, match="kind:name"):
        backbones.parse_spec("resnet8")
    with pytest.raises(ValueError, match="resnet18"):
        backbones.parse_spec("timm:resnet_18")


def test_timm_without_weights_is_unavailable_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # empty caches
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    start = time.monotonic()
    with pytest.raises(BackboneUnavailable) as err:
        timm_models.load_timm("resnet18")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "--checkpoint" in message and "resnet18" in message and "HF cache" in message
    with pytest.raises(BackboneUnavailable, match="no such file"):
        timm_models.load_timm("resnet18", checkpoint=tmp_path / "missing.pth")


def test_timm_from_local_checkpoint_embeds_grayscale(tmp_path, fmnist):
    import timm

    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = timm_models.load_timm("resnet18", checkpoint=path)
    feats = embed_all(model, fmnist[0][:4], batch_size=2)
    assert feats.shape == (4, 512) and model.embed_dim == 512
    torch.testing.assert_close(model.model.conv1.weight, source.conv1.weight)
