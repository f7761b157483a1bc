"""Reference timing of the diffusers (PyTorch) Wuerstchen v2 at full size, random weights.

Times the same work the combined pipeline does: two CLIP text encoders, the Stage C
prior loop with classifier-free guidance (29 steps, DEFAULT_STAGE_C_TIMESTEPS), the
Stage B decoder loop (12 steps, no guidance) and the Stage A VQGAN decode.
Usage (on the lent GPU, with a diffusers wheel carried):
    python diffusers_reference.py [--compile] [--dtype bf16|fp16] [--batch 1 4] [--res 1024]
A copy of the project's shared/bench script, so it travels with the repository; `gpu_suite.py` runs it.
"""

import argparse
import json
import math
import time

import numpy as np
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from transformers import CLIPTextConfig, CLIPTextModel

DEFAULT_STAGE_C_TIMESTEPS = list(np.linspace(1.0, 2 / 3, 20)) + list(np.linspace(2 / 3, 0.0, 11))[1:]

BIGG = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1280,
)
VITH = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=1024,
)


def sync():
    torch.cuda.synchronize()


def build(dtype, dev):
    torch.manual_seed(0)
    with torch.device(dev):
        prior = WuerstchenPrior(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24).to(dtype).eval()
        decoder = WuerstchenDiffNeXt().to(dtype).eval()
        vqgan = PaellaVQModel().to(dtype).eval()
        te_prior = CLIPTextModel(CLIPTextConfig(**BIGG)).to(dtype).eval()
        te_dec = CLIPTextModel(CLIPTextConfig(**VITH)).to(dtype).eval()
    return prior, decoder, vqgan, te_prior, te_dec


def nparams(m):
    return sum(p.numel() for p in m.parameters())


@torch.inference_mode()
def run_once(models, B, res, dtype, dev, sched):
    prior, decoder, vqgan, te_prior, te_dec = models
    t = {}
    t0 = time.perf_counter()
    ids = torch.randint(0, 49407, (2 * B, 77), device=dev)
    c_prior = te_prior(ids).last_hidden_state
    ids_d = torch.randint(0, 49407, (B, 77), device=dev)
    c_dec = te_dec(ids_d).last_hidden_state
    sync()
    t1 = time.perf_counter()
    t["text"] = t1 - t0
    h = math.ceil(res / 42.67)
    lat = torch.randn(B, 16, h, h, device=dev, dtype=dtype)
    sched.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS, device=dev)
    for tt in sched.timesteps[:-1]:
        r = tt.expand(B).to(dtype)
        out = prior(torch.cat([lat] * 2), r=torch.cat([r] * 2), c=c_prior)
        a, b = out.chunk(2)
        out = torch.lerp(b, a, 4.0)
        lat = sched.step(out, r, lat).prev_sample
    sync()
    t2 = time.perf_counter()
    t["prior"] = t2 - t1
    effnet = lat * 42.0 - 1.0
    hd = int(h * 10.67)
    x = torch.randn(B, 4, hd, hd, device=dev, dtype=dtype)
    sched.set_timesteps(12, device=dev)
    for tt in sched.timesteps[:-1]:
        r = tt.expand(B).to(dtype)
        out = decoder(x, r=r, effnet=effnet, clip=c_dec)
        x = sched.step(out, r, x).prev_sample
    sync()
    t3 = time.perf_counter()
    t["decoder"] = t3 - t2
    img = vqgan.decode(x * vqgan.config.scale_factor).sample.clamp(0, 1)
    sync()
    t4 = time.perf_counter()
    t["vqgan"] = t4 - t3
    t["total"] = t4 - t0
    t["finite"] = bool(torch.isfinite(img).all())
    t["img_shape"] = list(img.shape)
    return t


def flops(models, B, res, dtype, dev):
    from torch.utils.flop_counter import FlopCounterMode

    prior, decoder, vqgan, te_prior, te_dec = models
    h = math.ceil(res / 42.67)
    hd = int(h * 10.67)
    out = {}
    with torch.inference_mode():
        for name, fn in [
            (
                "prior_fwd_batch2",
                lambda: prior(
                    torch.randn(2, 16, h, h, device=dev, dtype=dtype),
                    r=torch.ones(2, device=dev, dtype=dtype),
                    c=torch.randn(2, 77, 1280, device=dev, dtype=dtype),
                ),
            ),
            (
                "decoder_fwd_batch1",
                lambda: decoder(
                    torch.randn(1, 4, hd, hd, device=dev, dtype=dtype),
                    r=torch.ones(1, device=dev, dtype=dtype),
                    effnet=torch.randn(1, 16, h, h, device=dev, dtype=dtype),
                    clip=torch.randn(1, 77, 1024, device=dev, dtype=dtype),
                ),
            ),
            ("vqgan_decode_batch1", lambda: vqgan.decode(torch.randn(1, 4, hd, hd, device=dev, dtype=dtype))),
            ("te_bigG_batch1", lambda: te_prior(torch.randint(0, 49407, (1, 77), device=dev))),
            ("te_H_batch1", lambda: te_dec(torch.randint(0, 49407, (1, 77), device=dev))),
        ]:
            fc = FlopCounterMode(display=False)
            with fc:
                fn()
            out[name] = fc.get_total_flops()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--flops", action="store_true")
    a = ap.parse_args()
    dev = "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    models = build(dtype, dev)
    info = {
        "params": {
            n: nparams(m) for n, m in zip(["prior", "decoder", "vqgan", "te_bigG", "te_H"], models, strict=True)
        },
        "dtype": a.dtype,
        "compile": a.compile,
        "res": a.res,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
    }
    if a.flops:
        info["flops"] = flops(models, 1, a.res, dtype, dev)
    if a.compile:
        prior, decoder, vqgan, te_prior, te_dec = models
        prior = torch.compile(prior, mode="reduce-overhead", fullgraph=True)
        decoder = torch.compile(decoder, mode="reduce-overhead", fullgraph=True)
        models = (prior, decoder, vqgan, te_prior, te_dec)
    sched = DDPMWuerstchenScheduler()
    print(json.dumps(info), flush=True)
    for B in a.batch:
        tw = time.perf_counter()
        run_once(models, B, a.res, dtype, dev, sched)  # warm-up / compile
        warm = time.perf_counter() - tw
        runs = [run_once(models, B, a.res, dtype, dev, sched) for _ in range(a.reps)]
        med = {k: float(np.median([r[k] for r in runs])) for k in ["text", "prior", "decoder", "vqgan", "total"]}
        print(
            json.dumps(
                {
                    "batch": B,
                    "warmup_s": warm,
                    "median_s": med,
                    "finite": runs[-1]["finite"],
                    "img": runs[-1]["img_shape"],
                    "img_per_s": B / med["total"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
