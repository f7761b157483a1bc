"""A stage C ControlNet in a sampling loop: the condition made once per image, the control computed once (it is
the same at every step), scaled and repeated for classifier-free guidance, and a prior model function that hands
it to stage C.

    cond_image = make_condition("canny", images)                      # [B, H, W, 1] on the host
    control = compute_control(cn, cn_vars, cond_image, scale=1.0, copies=2)   # CFG: cond and uncond halves
    eps = controlled_prior_model(unet, unet_vars, x, r, {"pooled": ..., "text": ..., "image": ..., "control": control})

As the original notebooks, the unconditional half gets the same control as the conditional one
(`unconditions['cnet'] = cnet`), times the same `controlnet_conditioning_scale` (their `cnet_multiplier`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from wurst_jax.controlnet import filters
from wurst_jax.models.cascade.controlnet import Control, scale_control

KINDS = ("canny", "inpaint", "sr")


def make_condition(kind: str, images: Any, mask: Any = None, effnet: tuple[Any, Any] | None = None) -> Any:
    """The ControlNet input for `kind`: "canny" ([B, H, W, 1] edges), "inpaint" ([B, H, W, 4]; `mask` [B, H, W]
    bool, True = generate; see `filters.load_mask` / `filters.outpaint_mask`) or "sr" ([B, H/32, W/32, 16];
    `effnet` = (Stable Cascade's EfficientNet encoder, its variables))."""
    if kind == "canny":
        return filters.canny(images)
    if kind == "inpaint":
        if mask is None:
            raise ValueError("the inpaint ControlNet needs a mask (True / white where the image is generated)")
        return filters.inpaint(images, mask)
    if kind == "sr":
        if effnet is None:
            raise ValueError("the sr ControlNet needs the EfficientNet encoder (effnet=(module, variables))")
        return filters.super_resolution(*effnet, images)[0]
    raise ValueError(f"ControlNet kind must be one of {KINDS}, got {kind!r}")


def compute_control(controlnet: Any, variables: Any, condition: Any, scale: float = 1.0, copies: int = 1) -> Control:
    """`controlnet.apply(variables, condition)` times `scale`, each entry repeated `copies` times along the batch
    (2: a CFG batch [cond; uncond] of the same images)."""
    return _control(controlnet, copies, variables, jnp.asarray(condition), jnp.float32(scale))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _control(controlnet: Any, copies: int, variables: Any, condition: jax.Array, scale: jax.Array) -> Control:
    control = scale_control(controlnet.apply(variables, condition), scale)
    return tuple(None if c is None else jnp.concatenate([c] * copies, axis=0) for c in control)


def controlled_prior_model(module: Any, variables: Any, x: jax.Array, r: jax.Array, cond: dict) -> jax.Array:
    """A stage C model function (`module`, `variables`, x, r, cond) → ε like the prior pipeline's, with
    `cond["control"]` (None or absent: plain stage C) passed as the `control` input."""
    return module.apply(variables, x, r, cond["pooled"], cond["text"], cond["image"], control=cond.get("control"))
