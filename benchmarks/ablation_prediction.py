"""Ablation (CPU, ~20 min at 5000 steps): flow prediction vs x0 prediction for a DiT whose tokens carry as many
values as it is wide (the shapes world's 192 = 2x2 patch x 48 latent channels, in a 192-wide model).

    python benchmarks/ablation_prediction.py flow|x0 STEPS DIM LAYERS     # e.g. x0 5000 192 2

Trains on single 64x64 frames (one shape) with the flow-matching loss in both cases (x0: the network's output is the
clean latent, flow = (x_t - x0) / max(sigma, 0.05), as WanConfig(prediction="x0") does), then reports the x0 error at
four noise levels and writes 8 samples (24 Euler steps) under the ground truth to /tmp/ab_<mode>_<steps>.png.
Results: benchmarks/results/shapes_ablations_cpu.json.
"""
import sys
import time

import numpy as np
import torch
from PIL import Image
sys.path.insert(0, ".")
from model.config import WanConfig
from model.wan import WanDiT
from model.text_encoder import TextEncoder
from pipeline.schedule import FlowMatchSchedule
from pipeline.solvers import euler_sampler_sigmas
from model.pixel_codec import PixelShuffleCodec
from utils.shapes import sample_scenes, short_prompt, render
torch.set_num_threads(1)
mode, steps, dim, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ENCODER = "assets/shapes_base"  # the shipped (context-mixing) text encoder
torch.manual_seed(0)
text = TextEncoder.from_diffusers_folder(ENCODER, text_len=32, device="cpu")
codec = PixelShuffleCodec(spatial_factor=4)
net = WanDiT(WanConfig(dim=dim, ffn_dim=4 * dim, num_heads=dim // 32, num_layers=layers, text_dim=64, text_len=32,
                       freq_dim=32, in_dim=48, out_dim=48))
net.init_weights()
sched = FlowMatchSchedule(5.0)
opt = torch.optim.AdamW(net.parameters(), lr=5e-4)
F = 1
def flow_of(xt, t, ctx):
    out = net(xt, t, ctx)
    if mode == "flow":
        return out
    sigma = (t / 1000.0).clamp(min=0.05).view(-1, 1, 1, 1, 1)
    return (xt - out) / sigma          # the network predicts x0
g = torch.Generator().manual_seed(1)
def batch(n, gen):
    sc = sample_scenes(n, gen, "train", num_shapes=1)
    with torch.no_grad():
        ctx = text([short_prompt(s) for s in sc])
    return sc, codec.encode_to_latent(render(sc, F)), ctx
tic = time.time()
for step in range(steps):
    sc, x0, ctx = batch(32, g)
    t = sched.timesteps[torch.randint(0, 1000, (32,), generator=g)]
    noise = torch.randn(x0.shape, generator=g)
    xt = sched.add_noise(x0, noise, t[:, None].expand(-1, F))
    loss = ((flow_of(xt, t, ctx) - (noise - x0)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 500 == 0:
        print(mode, step, round(float(loss.detach()), 4), f"{time.time()-tic:.0f}s", flush=True)
sc, x0, ctx = batch(64, torch.Generator().manual_seed(99))
res = []
with torch.no_grad():
    for s in (0.2, 0.5, 0.8, 0.95):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
        t = torch.full((64,), s * 1000)
        xt = (1 - s) * x0 + s * noise
        x0p = xt - s * flow_of(xt, t, ctx)
        res.append(f"s={s}: {float(((x0p - x0) ** 2).mean()):.4f}")
    x = torch.randn(8, F, 48, 16, 16, generator=torch.Generator().manual_seed(3))
    sig = euler_sampler_sigmas(24, 5.0)
    for i in range(24):
        x = x + (float(sig[i + 1]) - float(sig[i])) * flow_of(x, torch.full((8,), float(sig[i]) * 1000), ctx[:8])
truth = codec.decode_to_pixel(x0[:8])[:, 0] * 0.5 + 0.5
samples = (codec.decode_to_pixel(x)[:, 0] * 0.5 + 0.5).clamp(0, 1)
grid = torch.cat(list(torch.cat([truth, samples], 2)), 2).permute(1, 2, 0)
Image.fromarray((grid.numpy() * 255).astype(np.uint8)).save(f"/tmp/ab_{mode}_{steps}.png")
print(mode, "x0 mse", " ".join(res))
