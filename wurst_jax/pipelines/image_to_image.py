"""Image-to-image and image variation from the EfficientNet semantic encoder, for both generations: an image →
EfficientNet latents [B, h, w, 16] (the space Würstchen v2's decoder is conditioned on and its prior predicts, and
the space Stable Cascade's stage C samples in) → noised to t = `strength` → the prior's remaining steps; or, for
v2 image variation, straight to the decoder (no prior).

The schedule follows the original Stable Cascade recipe (Stability-AI/StableCascade's image-to-image example,
`inference/text_to_image.ipynb`, read here through a script exported from it: `noise_level = 0.8`,
`x_init = gdf.diffuse(encode_latents(batch), t=noise_level)`, `t_start = noise_level`, `timesteps = int(20 ·
noise_level)`): with `num_inference_steps` n, `int(n · strength)` steps evenly from t = strength to 0; with explicit
`timesteps`, the ones below `strength` (after t_start itself). The original samples with its GDF `shift=2`
schedule; ours is the pipelines' DDPM-Würstchen sampler. `strength` 1 ignores the image (exactly text-to-image);
`strength` → 0 returns the encoder's embeddings (below t ≈ 2.5e-3 the sampler's alpha_cumprod is clamped to
0.9999, as diffusers': the result is then sqrt(0.9999) · embedding + 0.01 · the seed's noise).

The image is prepared as the original's `encode_latents` sees it (`train/train_c.py`: ImageNet `Normalize` on
`resize_image`'s output, a bilinear antialiased resize of the [0, 1] image): here resized to 32× the prior's grid
(768² for a 1024² image, the original's size for square images); a non-square image is resized to the requested
aspect (the original needs the image's latent to match the requested shape already). `jax.image.resize` "linear"
with antialias equals torchvision's antialiased bilinear resize (tests/test_img2img_cli.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from wurst_jax.pipelines.components import Component


def check_strength(strength: Any, image: Any, name: str = "image") -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` must be a number in (0, 1], got {strength!r}")
    if strength < 1.0 and image is None:
        raise ValueError(f"`strength` < 1 needs an `{name}` to start from")
    return float(strength)


def schedule(sampler: Any, num_inference_steps: Any, timesteps: Any, strength: float, shift: float = 1.0) -> np.ndarray:
    """`int(num_inference_steps · strength)` steps from t = `strength` (or the given `timesteps` below it), shifted
    by `shift` (passed on only when not 1, as `args.schedule` does)."""
    opts = {} if shift == 1 else {"shift": shift}
    if timesteps is not None:
        return np.asarray(sampler.timesteps(timesteps=timesteps, t_start=strength, **opts), np.float32)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
    n = max(1, int(num_inference_steps * strength))
    return np.asarray(sampler.timesteps(n, t_start=strength, **opts), np.float32)


def as_images(image: Any, name: str = "image") -> np.ndarray:
    """PIL image(s) / arrays → float32 [B, H, W, 3] in [0, 1]."""
    items = image if isinstance(image, (list, tuple)) else [image]
    arrays = []
    for im in items:
        a = np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)
        a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
        arrays += list(a) if a.ndim == 4 else [a]
    if not arrays or any(a.ndim != 3 or a.shape[-1] != 3 for a in arrays):
        raise ValueError(
            f"`{name}` must be RGB images [H, W, 3] (PIL, arrays, a list, or [B, H, W, 3]); got {image!r:.80}"
        )
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"`{name}`: the images differ in size {sorted({a.shape for a in arrays})}; resize them first")
    return np.stack(arrays)


def load_effnet(path: Any, dtype: Any) -> Component:
    """The EfficientNet encoder: (module, variables), a component folder (`load_component`: config.json +
    safetensors, or converted), or an original single file (Stable Cascade's `effnet_encoder.safetensors`,
    Würstchen v2's `model_v2_stage_b.pt` with its `effnet_state_dict`), its config read off the tensors."""
    if isinstance(path, tuple):
        module, variables = path
        return Component(module, jax.device_put(variables))  # committed arrays (a Component keeps shardings)
    from wurst_jax.weights import load_component

    p = Path(path).expanduser()
    if p.is_file():
        from wurst_jax.sharding import ShardingPlan
        from wurst_jax.weights.load import module_from_source
        from wurst_jax.weights.sources import open_file

        return Component(*module_from_source(open_file(p, "effnet"), ShardingPlan(), dtype))
    return Component(*load_component(p, dtype=dtype))


def _encode(variables: Any, images: Any, *, module: Any, size: tuple[int, int]) -> Any:
    from wurst_jax.models.effnet import encode

    return encode(module, variables, images, size)


def encode_images(pipe: Any, image: Any, grid: tuple[int, int], channels: int, name: str = "image") -> np.ndarray:
    """[B, h, w, C] semantic latents of the images for an (h, w) grid, seen by the encoder at 32× the grid (as
    prepare-data does). `pipe` holds the encoder (`effnet`, from `load_effnet`) and a `compiler`."""
    if pipe.effnet is None:
        raise ValueError(f"`{name}` needs the EfficientNet encoder: call `pipe.load_effnet(path)` first")
    from wurst_jax.models.effnet import DOWNSCALE

    images = as_images(image, name)
    size = (grid[0] * DOWNSCALE, grid[1] * DOWNSCALE)
    with pipe.effnet.on_device() as variables:
        out = pipe.compiler("effnet", _encode, {"module": pipe.effnet.module, "size": size}, variables, images)
    if out.shape[-1] != channels:
        raise ValueError(f"the EfficientNet encoder gives {out.shape[-1]} channels; this model works on {channels}")
    return np.asarray(jax.device_get(out), np.float32)


def count(image: Any) -> int:
    """How many images `image` holds (a PIL image / [H, W, 3] array: 1; a list or [B, H, W, 3]: B)."""
    if isinstance(image, (list, tuple)):
        return sum(count(im) for im in image)
    return int(np.shape(image)[0]) if np.ndim(image) == 4 else 1


def paired(n: int, n_per: int, k: int) -> int:
    """The number of generated images for n = prompts × n_per and k start images (see `pair`)."""
    if k in (1, n) or k * n_per == n:
        return n
    if n == n_per:  # one prompt over several images
        return k * n_per
    raise ValueError(f"{k} images for {n // n_per} prompts: pass one image, one per prompt, or one prompt")


def pair(cond: Any, uncond: Any, emb: np.ndarray, n_per: int) -> tuple[Any, Any, np.ndarray]:
    """Match prompts and images: one image for every prompt, one per prompt, or one prompt over every image.
    `cond` / `uncond` are arrays or dicts of arrays [N, ...] (None: no guidance); returns them with the start
    latents [N', h, w, C], one prompt's rows tiled over the images in the last case (images grouped: image 0's
    `n_per` first)."""
    n = jax.tree_util.tree_leaves(cond)[0].shape[0]
    k = emb.shape[0]
    total = paired(n, n_per, k)
    if total == n:
        return cond, uncond, np.repeat(emb, n // k, axis=0)
    tile = lambda x: np.tile(np.asarray(x), (k,) + (1,) * (np.ndim(x) - 1))  # noqa: E731
    rep = lambda tree: None if tree is None else jax.tree_util.tree_map(tile, tree)  # noqa: E731
    return rep(cond), rep(uncond), np.repeat(emb, n_per, axis=0)
