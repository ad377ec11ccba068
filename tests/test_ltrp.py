"""LTRP core: MAE decoder masking, pseudo-scores, ListMLE, ranker, top-k, official checkpoints.

Real components only: tiny models, real Fashion-MNIST images (the session fixture `fmnist_test`).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.ltrp import ranker as ltrp_ranker
from core.ltrp.mae import (
    MAEConfig,
    MAEHasNoDecoder,
    MaskedAutoencoder,
    evaluate_mae,
    load_mae,
    load_official_mae,
    reconstruct,
    save_mae,
    train_mae,
)
from core.ltrp.vit import isolation_attn_mask, random_visible_idx, visible_mask

TINY = MAEConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, heads=2,
                 decoder_embed_dim=32, decoder_depth=2, decoder_heads=2)
TINY_RANKER = dict(embed_dim=32, depth=2, heads=2)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: far faster on a busy 2-core machine


def tiny_mae(seed: int = 0, cfg: MAEConfig = TINY) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return MaskedAutoencoder(cfg).eval()


@pytest.fixture(scope="module")
def trained_mae(fmnist_test):
    """A tiny MAE trained for a few seconds on 1,024 real images."""
    images = fmnist_test[0][:1024]
    model, _ = train_mae(images, TINY, epochs=4, batch_size=64, lr=3e-3, seed=0, device="cpu")
    return model


# ---------------------------------------------------------------------------------------------
# Decoder attention mask


def test_isolated_token_cannot_reach_any_other_position():
    mae = tiny_mae()
    seq = 1 + TINY.num_patches
    tokens = torch.randn(2, seq, TINY.decoder_embed_dim)
    i = 17  # sequence position (patch 16)
    blocked = torch.zeros(2, seq, dtype=torch.bool)
    blocked[:, i] = True
    changed = tokens.clone()
    changed[:, i] += 3.0 * torch.randn(2, TINY.decoder_embed_dim)
    others = [p for p in range(TINY.num_patches) if p != i - 1]

    with torch.no_grad():
        mask = isolation_attn_mask(blocked)
        masked_a = mae.decode_tokens(tokens, mask)[:, others]
        masked_b = mae.decode_tokens(changed, mask)[:, others]
        open_a = mae.decode_tokens(tokens)[:, others]
        open_b = mae.decode_tokens(changed)[:, others]

    torch.testing.assert_close(masked_a, masked_b, rtol=0, atol=1e-6)
    assert (open_a - open_b).abs().amax(dim=-1).min() > 1e-4  # unmasked, token i reaches every position


def test_isolation_mask_closes_row_and_column_only():
    blocked = torch.tensor([[False, True, False, False]])
    allowed = isolation_attn_mask(blocked)[0, 0]
    assert allowed.shape == (4, 4)
    assert not allowed[[0, 2, 3], 1].any() and not allowed[1, [0, 2, 3]].any()  # column and row
    assert allowed[1, 1]  # the blocked token keeps only itself
    assert allowed[[0, 2, 3]][:, [0, 2, 3]].all()


# ---------------------------------------------------------------------------------------------
# Pseudo-scores


def _scores_by_removing_tokens(mae: MaskedAutoencoder, x: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
    """Reference: one decoder call per visible token, with that token deleted from the sequence."""
    num_patches = mae.cfg.num_patches
    latent = mae.encode(mae.normalize(x), visible_idx)
    tokens = mae.decoder_tokens(latent, visible_idx)
    anchor = mae.decode_tokens(tokens)
    scores = torch.zeros(visible_idx.shape)
    for b in range(len(x)):
        masked = [p for p in range(num_patches) if p not in visible_idx[b].tolist()]
        for j, patch in enumerate(visible_idx[b].tolist()):
            keep = [s for s in range(1 + num_patches) if s != patch + 1]
            out = mae.decode_tokens(tokens[b:b + 1, keep])[0]  # [L - 1, P], patches keep[1:] - 1
            row_of = {s - 1: r for r, s in enumerate(keep[1:])}
            rows = [row_of[p] for p in masked]
            scores[b, j] = (out[rows] - anchor[b, masked]).abs().mean()
    return scores


def test_vectorised_pseudo_scores_equal_a_slow_loop(trained_mae, fmnist_test):
    images = fmnist_test[0][2000:2006]
    gen = torch.Generator().manual_seed(3)
    visible_idx, scores = ltrp_ranker.pseudo_scores(trained_mae, images, mask_ratio=0.8, generator=gen)

    assert visible_idx.shape == scores.shape == (6, 9)  # int(49 * 0.2) = 9 visible
    assert (visible_idx.diff(dim=1) > 0).all()  # sorted, distinct
    assert len({tuple(r) for r in visible_idx.tolist()}) == 6  # a fresh mask per image
    with torch.no_grad():
        x = torch.from_numpy(np.array(images)).float()[:, None]
        reference = _scores_by_removing_tokens(trained_mae, x, visible_idx)
    torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-7)
    assert (scores > 0).all()


def test_pseudo_scores_use_masked_patches_only():
    torch.manual_seed(0)
    b, v, num_patches, p = 3, 5, 16, 4
    preds = torch.randn(b, v + 1, num_patches, p)
    visible_idx = random_visible_idx(b, num_patches, v, torch.Generator().manual_seed(1))
    scores = ltrp_ranker.ablation_scores(preds, visible_idx)

    at_visible = preds.clone()
    at_masked = preds.clone()
    for i in range(b):
        at_visible[i][:, visible_idx[i]] += torch.randn(v + 1, v, p)
        masked = (~visible_mask(visible_idx[i:i + 1], num_patches))[0].nonzero().squeeze(1)
        at_masked[i][:v, masked[0]] += 1.0  # one masked patch of the ablated decodings
    torch.testing.assert_close(ltrp_ranker.ablation_scores(at_visible, visible_idx), scores, rtol=0, atol=0)
    assert not torch.allclose(ltrp_ranker.ablation_scores(at_masked, visible_idx), scores)
    # and it is the mean absolute difference to the anchor (last row)
    i, j = 1, 2
    masked = ~visible_mask(visible_idx, num_patches)[i]
    expected = (preds[i, j, masked] - preds[i, -1, masked]).abs().mean()
    torch.testing.assert_close(scores[i, j], expected)


def test_pseudo_scores_need_two_visible_patches():
    with pytest.raises(ValueError, match="visible"):
        ltrp_ranker.pseudo_scores(tiny_mae(), np.zeros((2, 28, 28, 1), np.uint8), mask_ratio=0.99,
                           generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# ListMLE


def _list_mle_by_formula(pred: list[float], target: list[float]) -> float:
    order = sorted(range(len(target)), key=lambda i: -target[i])
    ranked = [pred[i] for i in order]
    return sum(math.log(sum(math.exp(s) for s in ranked[i:])) - ranked[i] for i in range(len(ranked)))


def test_list_mle_matches_the_formula():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    expected = np.mean([_list_mle_by_formula(p.tolist(), t.tolist()) for p, t in zip(pred, target)])
    assert ltrp_ranker.list_mle(pred, target).item() == pytest.approx(expected, rel=1e-6)
    big = ltrp_ranker.list_mle(pred * 1000, target)  # numerically stable
    assert torch.isfinite(big)


def test_list_mle_is_lowest_for_the_true_order():
    values = torch.tensor([2.0, 1.1, 0.3, -0.4, -1.5])
    target = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3]])
    true_order = target[0].argsort(descending=True)
    best = torch.empty(5)
    best[true_order] = values  # the highest pred on the highest target, and so on
    best_loss = ltrp_ranker.list_mle(best[None], target).item()
    for perm in itertools.permutations(range(5)):
        pred = values[list(perm)][None]
        if torch.equal(pred[0], best):
            continue
        assert ltrp_ranker.list_mle(pred, target).item() > best_loss + 1e-6


# ---------------------------------------------------------------------------------------------
# Ranker, top-k, score maps


def test_top_k_returns_exactly_round_kr_l_highest_indices():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 49))
    for kr in (0.01, 0.1, 0.25, 0.5, 0.75, 1.0):
        k = max(1, round(kr * 49))
        idx = ltrp_ranker.top_k(scores, kr)
        assert idx.shape == (3, k)
        for row, s in zip(idx, scores):
            assert len(set(row.tolist())) == k
            assert np.all(np.diff(s[row]) <= 0)  # highest first
            assert s[row].min() >= np.delete(s, row).max(initial=-np.inf)
    single = ltrp_ranker.top_k(scores[0], 0.25)
    assert single.shape == (12,) and single[0] == scores[0].argmax()
    with pytest.raises(ValueError):
        ltrp_ranker.top_k(scores, 0.0)


def test_score_map_image_is_row_major():
    heat = ltrp_ranker.score_map_image(np.arange(12), (3, 4))
    assert heat.dtype == np.float32 and heat.shape == (3, 4) and heat[1, 0] == 4 and heat[2, 3] == 11


def test_ranker_scores_visible_patches_as_in_the_full_image_forward():
    torch.manual_seed(0)
    for head in ltrp_ranker.HEADS:
        ranker = ltrp_ranker.Ranker(ltrp_ranker.RankerConfig(head=head, **TINY_RANKER)).eval()
        x = torch.rand(2, 1, 28, 28) * 255
        all_visible = torch.arange(49).expand(2, -1)
        with torch.no_grad():
            full = ranker(x)
            assert full.shape == (2, 49)
            torch.testing.assert_close(ranker(x, all_visible), full, rtol=1e-5, atol=1e-5)
            assert ranker(x, all_visible[:, :7]).shape == (2, 7)


def test_ranker_training_is_deterministic_and_improves_agreement(trained_mae, fmnist_test, tmp_path):
    images = fmnist_test[0][:768]
    held_out = fmnist_test[0][5000:5256]
    config = ltrp_ranker.RankerConfig.for_mae(trained_mae, **TINY_RANKER)
    kwargs = dict(epochs=2, batch_size=64, lr=2e-3, mask_ratio=0.75, seed=1, eval_images=held_out, device="cpu")
    ranker, metrics = ltrp_ranker.train_ranker(trained_mae, images, config, **kwargs)

    before, after = metrics["agreement_before"]["spearman"], metrics["agreement"]["spearman"]
    assert after > before + 0.3, metrics  # measured over 3 seeds: +0.43 to +0.61 after these 24 steps
    assert metrics["agreement"]["kendall"] > metrics["agreement_before"]["kendall"]

    maps = ltrp_ranker.score_maps(ranker, fmnist_test[0][:20], batch_size=8)
    assert maps.shape == (20, 49) and maps.dtype == np.float32
    short = {**kwargs, "epochs": 1, "eval_images": held_out[:8]}
    again, _ = ltrp_ranker.train_ranker(trained_mae, images[:128], config, **short)
    again_twice, _ = ltrp_ranker.train_ranker(trained_mae, images[:128], config, **short)
    np.testing.assert_array_equal(ltrp_ranker.score_maps(again, fmnist_test[0][:20]),
                                  ltrp_ranker.score_maps(again_twice, fmnist_test[0][:20]))

    path = tmp_path / "ranker.pt"
    ltrp_ranker.save_ranker(ranker, path, {"kind": "test"})
    loaded, meta = ltrp_ranker.load_ranker(path)
    assert meta == {"kind": "test"}
    np.testing.assert_array_equal(ltrp_ranker.score_maps(loaded, fmnist_test[0][:20]), maps)


# ---------------------------------------------------------------------------------------------
# MAE training, reconstruction, checkpoints


def test_mae_training_reduces_the_loss(fmnist_test):
    images, held_out = fmnist_test[0][:1024], fmnist_test[0][6000:6512]
    untrained, _ = train_mae(images, TINY, epochs=0, seed=0, device="cpu")
    trained, metrics = train_mae(images, TINY, epochs=2, batch_size=64, lr=3e-3, seed=0, device="cpu")
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0]
    assert evaluate_mae(trained, held_out) < 0.8 * evaluate_mae(untrained, held_out)


def test_reconstruct_pastes_the_kept_patches(trained_mae, fmnist_test, tmp_path):
    images = fmnist_test[0][:5, :, :, None]
    rng = np.random.default_rng(0)
    keep = np.stack([rng.permutation(49)[:12] for _ in range(5)])
    pasted, raw = reconstruct(trained_mae, images, keep)
    assert pasted.shape == raw.shape == images.shape and pasted.dtype == np.uint8
    tiles = lambda a: a.reshape(5, 7, 4, 7, 4).transpose(0, 1, 3, 2, 4).reshape(5, 49, 16)  # noqa: E731
    kept = visible_mask(torch.from_numpy(keep), 49).numpy()
    np.testing.assert_array_equal(tiles(pasted[..., 0])[kept], tiles(images[..., 0])[kept])
    np.testing.assert_array_equal(tiles(pasted[..., 0])[~kept], tiles(raw[..., 0])[~kept])

    path = tmp_path / "mae.pt"
    save_mae(trained_mae, path, {"epochs": 4})
    loaded, meta = load_mae(path)
    assert meta == {"epochs": 4} and loaded.cfg == TINY
    np.testing.assert_array_equal(reconstruct(loaded, images, keep)[1], raw)


def test_patchify_uses_the_official_pixel_order():
    mae = tiny_mae(cfg=MAEConfig(img_size=8, patch_size=4, in_chans=3, embed_dim=16, heads=2,
                                 decoder_embed_dim=16, decoder_heads=2))
    imgs = torch.randn(2, 3, 8, 8)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 4, 48)
    # patch 1 = top-right; its vector runs over pixel rows, then columns, then channels (official)
    torch.testing.assert_close(patches[:, 1], imgs[:, :, 0:4, 4:8].permute(0, 2, 3, 1).reshape(2, 48))
    torch.testing.assert_close(mae.unpatchify(patches), imgs)


def _official_state(cfg: MAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official models_mae names and shapes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return 0.2 * torch.randn(*shape, generator=g)

    def blocks(prefix: str, depth: int, d: int) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(depth):
            for name, shape in [("norm1.weight", (d,)), ("norm1.bias", (d,)), ("attn.qkv.weight", (3 * d, d)),
                                ("attn.qkv.bias", (3 * d,)), ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                                ("norm2.weight", (d,)), ("norm2.bias", (d,)), ("mlp.fc1.weight", (4 * d, d)),
                                ("mlp.fc1.bias", (4 * d,)), ("mlp.fc2.weight", (d, 4 * d)), ("mlp.fc2.bias", (d,))]:
                out[f"{prefix}.{i}.{name}"] = rnd(*shape) + (1.0 if "norm" in name and "weight" in name else 0.0)
        return out

    d, dd, p, c, n = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_size, cfg.in_chans, cfg.num_patches
    return {
        "patch_embed.proj.weight": rnd(d, c, p, p), "patch_embed.proj.bias": rnd(d),
        "cls_token": rnd(1, 1, d), "pos_embed": rnd(1, n + 1, d),
        **blocks("blocks", cfg.depth, d), "norm.weight": 1 + rnd(d), "norm.bias": rnd(d),
        "decoder_embed.weight": rnd(dd, d), "decoder_embed.bias": rnd(dd), "mask_token": rnd(1, 1, dd),
        "decoder_pos_embed": rnd(1, n + 1, dd), **blocks("decoder_blocks", cfg.decoder_depth, dd),
        "decoder_norm.weight": 1 + rnd(dd), "decoder_norm.bias": rnd(dd),
        "decoder_pred.weight": rnd(p * p * c, dd), "decoder_pred.bias": rnd(p * p * c),
    }


def _official_forward(state, imgs, ids_keep, heads, decoder_heads):
    """The official MaskedAutoencoderViT forward (encoder on kept patches, decoder), written out."""
    def block(x, prefix, h):
        y = F.layer_norm(x, x.shape[-1:], state[f"{prefix}.norm1.weight"], state[f"{prefix}.norm1.bias"], 1e-6)
        b, n, d = y.shape
        qkv = F.linear(y, state[f"{prefix}.attn.qkv.weight"], state[f"{prefix}.attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(y, state[f"{prefix}.attn.proj.weight"], state[f"{prefix}.attn.proj.bias"])
        y = F.layer_norm(x, x.shape[-1:], state[f"{prefix}.norm2.weight"], state[f"{prefix}.norm2.bias"], 1e-6)
        y = F.gelu(F.linear(y, state[f"{prefix}.mlp.fc1.weight"], state[f"{prefix}.mlp.fc1.bias"]))
        return x + F.linear(y, state[f"{prefix}.mlp.fc2.weight"], state[f"{prefix}.mlp.fc2.bias"])

    def depth(prefix):
        return len({k.split(".")[1] for k in state if k.startswith(prefix + ".")})

    x = F.conv2d(imgs, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"],
                 stride=state["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = x + state["pos_embed"][:, 1:]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([(state["cls_token"] + state["pos_embed"][:, :1]).expand(len(x), -1, -1), x], 1)
    for i in range(depth("blocks")):
        x = block(x, f"blocks.{i}", heads)
    x = F.layer_norm(x, x.shape[-1:], state["norm.weight"], state["norm.bias"], 1e-6)
    x = F.linear(x, state["decoder_embed.weight"], state["decoder_embed.bias"])
    n = state["decoder_pos_embed"].shape[1] - 1
    full = state["mask_token"].repeat(len(x), n, 1)
    full[torch.arange(len(x))[:, None], ids_keep] = x[:, 1:]
    x = torch.cat([x[:, :1], full], 1) + state["decoder_pos_embed"]
    for i in range(depth("decoder_blocks")):
        x = block(x, f"decoder_blocks.{i}", decoder_heads)
    x = F.layer_norm(x, x.shape[-1:], state["decoder_norm.weight"], state["decoder_norm.bias"], 1e-6)
    return F.linear(x, state["decoder_pred.weight"], state["decoder_pred.bias"])[:, 1:]


def test_official_layout_checkpoint_loads_and_matches_the_official_forward(tmp_path):
    shape = MAEConfig(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, heads=4,
                      decoder_embed_dim=32, decoder_depth=1, decoder_heads=2)
    state = _official_state(shape)
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save({"model": state}, path)

    model = load_official_mae(path, heads=4, decoder_heads=2)
    assert model.cfg == shape
    imgs = torch.rand(3, 3, 32, 32) * 255
    keep = random_visible_idx(3, 16, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(imgs, keep)
        normed = (imgs / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        theirs = _official_forward(state, normed, keep, heads=4, decoder_heads=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    wrong_heads = load_official_mae({"model": state}, heads=1, decoder_heads=2)
    with torch.no_grad():
        assert not torch.allclose(wrong_heads(imgs, keep), theirs, atol=1e-3)


def test_official_loader_infers_base_heads_and_rejects_encoder_only_checkpoints():
    import timm

    encoder_only = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0).state_dict()
    with pytest.raises(MAEHasNoDecoder, match="decoder") as err:
        load_official_mae(encoder_only)
    assert "mae_visualize_vit_base.pth" in str(err.value) and "vit_base_patch16_224.mae" in str(err.value)

    state = _official_state(MAEConfig(img_size=32, patch_size=16, in_chans=3, embed_dim=768, depth=1, heads=12,
                                      decoder_embed_dim=512, decoder_depth=1, decoder_heads=16))
    cfg = load_official_mae({"model": state}).cfg
    assert (cfg.heads, cfg.decoder_heads, cfg.img_size, cfg.patch_size) == (12, 16, 32, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (autocast is a no-op on the CPU)")
def test_pseudo_scores_stay_full_precision_inside_autocast(trained_mae, fmnist_test):
    """The ranker's training step runs under bf16/fp16 autocast; its pseudo-score targets must not."""
    mae = trained_mae.to("cuda")
    try:
        x = torch.from_numpy(np.array(fmnist_test[0][:256])).float()[:, None].cuda()
        exact = ltrp_ranker.pseudo_scores(mae, x, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))[1]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            inside = ltrp_ranker.pseudo_scores(mae, x, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))[1]
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, exact)
    finally:
        mae.to("cpu")
