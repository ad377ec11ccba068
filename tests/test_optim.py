"""The training loop's optimisers are ours (torch.optim imports torch._dynamo on first use, seconds in every
job process that trains): they must update exactly as torch's do, with the loop's per-group learning rate
changing every step and weight decay on some groups only."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from core.training.optim import OptimSettings, make_optimizer


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def reference(m: nn.Module, settings: OptimSettings) -> torch.optim.Optimizer:
    params = [p for p in m.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.momentum, settings.beta2))


@pytest.mark.parametrize("name,lr", [("sgd", 0.1), ("adamw", 1e-2)])
def test_ours_update_exactly_as_torch_optim(name, lr):
    settings = OptimSettings(optimizer=name, lr=lr, weight_decay=5e-2, schedule="cosine", warmup_frac=0.2)
    ours, theirs = model(0), model(0)
    opt_ours, opt_theirs = make_optimizer(ours, settings), reference(theirs, settings)
    gen = torch.Generator().manual_seed(1)
    total = 30
    for step in range(total):
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for m, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for group in opt.param_groups:
                group["lr"] = settings.lr_at(step, total)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    moved = 0.0
    for a, b, start in zip(ours.parameters(), theirs.parameters(), model(0).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, (a - start).abs().max().item())
    assert moved > 1e-3  # the parameters did move: equal because both updated, not because neither did


def test_training_does_not_import_torch_dynamo():
    code = ("import sys, torch, torch.nn as nn\n"
            "from core.training.optim import OptimSettings, make_optimizer\n"
            "m = nn.Linear(3, 2); opt = make_optimizer(m, OptimSettings('sgd', 0.1, 1e-4, 'cosine', 0.2))\n"
            "m(torch.randn(4, 3)).sum().backward(); opt.step(); opt.zero_grad()\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
