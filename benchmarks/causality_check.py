"""The `small` NSA language model on the GPU (Triton kernels, bf16 autocast) cannot see the
future: logits up to position p are unchanged, bit for bit, when every token after p changes.
The compression MLPs get random weights first (they start at zero, i.e. as mean pooling, which
would hide a block that reached past its end).

  python benchmarks/causality_check.py
"""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from nsa.layer import BlockCompressor  # noqa: E402
from nsa.model import PRESETS, LanguageModel  # noqa: E402

torch.manual_seed(0)
m = LanguageModel(PRESETS["small"]).cuda().eval()
for mod in m.modules():
    if isinstance(mod, BlockCompressor):
        for p in mod.parameters():
            torch.nn.init.normal_(p, std=0.05)
T = 8192
x = torch.randint(0, 256, (2, T), device="cuda")
worst = 0
for p in (100, 1000, 4095, 7000):
    y = x.clone()
    y[:, p + 1:] = torch.randint(0, 256, (2, T - p - 1), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = m(x).float(), m(y).float()
    diff = (a[:, :p + 1] - b[:, :p + 1]).abs().max().item()
    after = (a[:, p + 1:] - b[:, p + 1:]).abs().max().item()
    print(f"prefix {p + 1:5d}: max |logit change| before = {diff:.3g}, after = {after:.3g}")
    worst = max(worst, diff)
print("causal" if worst == 0 else "NOT CAUSAL")
