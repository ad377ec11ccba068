"""What a training job process pays before its first step: torch.optim against redex's own optimisers.

Every `torch.optim` optimiser imports `torch._dynamo` on first use (`torch._disable_dynamo` on
`Optimizer.__init__`, `step` and `zero_grad`), and every subset-training run, backbone and LTRP model
trains in a job process of its own. The script times, in fresh processes, alternating and `--repeats`
times each: import torch, build the default backbone, make the optimiser, one training step, with
`torch.optim.SGD` (the baseline) and with `core.training.optim.make_optimizer` (ours). It prints the
medians, their ratio and the machine's load (`uptime`) before and after.

    .venv/bin/python bench/train_start.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from core.embed.backbones import build_model
from core.training.optim import OptimSettings, make_optimizer
model = build_model("trained:resnet8s2", 10, 1, 28)
settings = OptimSettings("sgd", 0.1, 5e-4, "one_cycle", 0.2)
t2 = time.perf_counter()
if sys.argv[1] == "torch":
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": 5e-4},
                           {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
else:
    opt = make_optimizer(model, settings)
x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
opt.zero_grad(set_to_none=True)
torch.nn.functional.cross_entropy(model(x), y).backward()
opt.step()
t3 = time.perf_counter()
print(json.dumps({"import_torch": t1 - t0, "optimiser_and_step": t3 - t2, "total": t3 - t0,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("load before:", uptime())
    runs: dict[str, list[dict]] = {"torch": [], "ours": []}
    for _ in range(args.repeats):
        for which in runs:  # alternating, so both see the same load
            out = subprocess.run([sys.executable, "-c", CHILD, which], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout
            runs[which].append(json.loads(out.strip().splitlines()[-1]))
    print("load after: ", uptime())
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("import_torch", "optimiser_and_step", "total")}
           for w, rs in runs.items()}
    for w, m in med.items():
        print(f"{w:5s} (torch._dynamo imported: {runs[w][0]['dynamo']}): import torch {m['import_torch']:.2f} s,"
              f" optimiser + first step {m['optimiser_and_step']:.2f} s, process to first step {m['total']:.2f} s"
              f" (median of {args.repeats})")
    print(f"ratio, optimiser + first step, torch.optim / ours: "
          f"{med['torch']['optimiser_and_step'] / med['ours']['optimiser_and_step']:.1f}x;"
          f" process to first step: {med['torch']['total'] / med['ours']['total']:.2f}x")


if __name__ == "__main__":
    main()
