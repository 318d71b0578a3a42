"""Zero-Shot Noise2Noise baseline (Mansour & Heckel, CVPR 2023, "ZS-N2N"), written from the paper's description.

The one noisy image y is split into two half-resolution images by two fixed 2×2 stride-2 filters that average
the two diagonals: d1 = ½(y[0::2, 0::2] + y[1::2, 1::2]) and d2 = ½(y[0::2, 1::2] + y[1::2, 0::2]). Their noise is
(nearly) independent, so a small CNN f that predicts the noise (the denoiser is x - f(x)) is trained as
Noise2Noise from one half to the other (residual loss) plus a consistency loss that asks "denoise then split"
to equal "split then denoise". Adam, lr 1e-3 halved every 1000 steps. The network is never told σ.
Benchmark-only: needs torch (CPU build), not a dependency of hpc_zsem.
"""
import time

import numpy as np


def zs_n2n(noisy, steps=2000, channels=48, lr=1e-3, seed=0, threads=1, scale=255.0):
    """Denoise a 2-D image `noisy` (intensities in 0..scale); returns (denoised float64 image, CPU seconds)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.process_time()
    y = torch.as_tensor(np.asarray(noisy, np.float32) / scale)[None, None]  # 1×1×H×W in [0, 1]-ish

    diag = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]])   # averages the main diagonal of each 2×2 block
    anti = torch.tensor([[[[0.0, 0.5], [0.5, 0.0]]]])   # averages the anti-diagonal

    def split(x):
        return F.conv2d(x, diag, stride=2), F.conv2d(x, anti, stride=2)

    net = nn.Sequential(  # two 3×3 conv layers and a 1×1 output layer, leaky ReLU; predicts the noise
        nn.Conv2d(1, channels, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
        nn.Conv2d(channels, 1, 1)).to(memory_format=torch.channels_last)  # ~25 % faster convs on CPU
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000, gamma=0.5)

    def denoise(x):
        return x - net(x)

    y = y.contiguous(memory_format=torch.channels_last)
    d1, d2 = (d.contiguous(memory_format=torch.channels_last) for d in split(y))
    for _ in range(steps):
        e1, e2 = denoise(d1), denoise(d2)
        loss_res = 0.5 * (F.mse_loss(e1, d2) + F.mse_loss(e2, d1))        # Noise2Noise between the halves
        s1, s2 = split(denoise(y))
        loss_cons = 0.5 * (F.mse_loss(e1, s1) + F.mse_loss(e2, s2))      # split∘denoise = denoise∘split
        opt.zero_grad()
        (loss_res + loss_cons).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        out = denoise(y)[0, 0].numpy().astype(np.float64) * scale
    return out, time.process_time() - t0
