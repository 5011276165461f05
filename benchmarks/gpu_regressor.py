"""GPU check of the HDemucs regressor (#16): paper-size L1 training steps under bf16 autocast,
one-pass separation and --init refinement through `pipelines.models.Separator` on CUDA, compared
with CPU.   python benchmarks/gpu_regressor.py"""

import tempfile
import time

import numpy as np
import torch

from msdm.checkpoint import build_model, parameter_count, save
from msdm.config import apply_overrides, load_config
from msdm.training import make_optimizer, train_step
from pipelines.models import Separator

assert torch.cuda.is_available()
dev = torch.device("cuda")
cfg = load_config("paper", ["model.kind=hdemucs", "train.batch_size=4"])
model = build_model(cfg).to(dev)
opt = make_optimizer(model, cfg)
x = 0.1 * torch.randn(4, 4, cfg.data.chunk_samples, device=dev)
for step in range(4):
    torch.cuda.synchronize()
    t0 = time.time()
    loss = train_step(model, x, opt, cfg, step=step)
    torch.cuda.synchronize()
    print(f"paper hdemucs ({parameter_count(cfg) / 1e6:.1f} M) step {step}: loss {float(loss):.4f}"
          f" {time.time() - t0:.3f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
assert torch.isfinite(loss)
model.eval()
with torch.no_grad():
    mix = x.sum(1, keepdim=True)
    torch.cuda.synchronize()
    t0 = time.time()
    est = model(mix)
    torch.cuda.synchronize()
    secs = time.time() - t0
print(f"paper hdemucs forward of 4 x {cfg.data.chunk_samples} samples: {secs:.3f} s, "
      f"RTF {secs / (4 * cfg.data.chunk_samples / cfg.data.sample_rate):.2e}")

tmp = tempfile.mkdtemp()
torch.manual_seed(0)
tiny = load_config("tiny")
reg = apply_overrides(tiny, {"model.kind": "hdemucs"})
save(f"{tmp}/unet.ckpt", tiny, build_model(tiny))
save(f"{tmp}/reg.ckpt", reg, build_model(reg))
g = np.random.default_rng(0)
mix = (0.2 * g.standard_normal((3, 4, tiny.data.chunk_samples))).sum(1).astype(np.float32)
keys = [("t", i) for i in range(3)]
near = apply_overrides(tiny, {"separation.init": f"{tmp}/reg.ckpt", "sampler.sigma_max": 1e-6,
                              "sampler.sigma_min": 1e-6, "sampler.s_churn": 0.0})
refine = apply_overrides(tiny, {"separation.init": f"{tmp}/reg.ckpt", "sampler.sigma_max": 0.3})
for name, ckpt, c in (("regressor", "reg", reg), ("init sigma->0", "unet", near),
                      ("refined", "unet", refine)):
    cpu = Separator(f"{tmp}/{ckpt}.ckpt", c, 0)(mix, keys)
    gpu = Separator(f"{tmp}/{ckpt}.ckpt", c, 1)(mix, keys)
    print(f"{name}: |gpu - cpu| max {np.abs(gpu - cpu).max():.2e}, |sum - mixture| max "
          f"{np.abs(gpu.sum(1) - mix).max():.2e}")
    if name == "regressor":
        regressed = gpu
    elif name == "init sigma->0":
        print(f"  vs regressor: {np.abs(gpu - regressed).max():.2e}")
print("OK")
