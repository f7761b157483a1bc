"""Tensor parallelism on Stable Cascade's released models: `check_heads` with the registry's head counts of every
preset (stage C 32, stage C lite 24, stage B 20, stage B lite 18 — its 9 sits on a level without attention and is
never split; the ViT-bigG text encoder 20) passes where
the model axis divides them all and otherwise raises one error naming the model, its heads and the sizes that
work. No weights: configs and meshes only."""

import jax
import pytest

import wurst_jax as wj
from wurst_jax.models import registry
from wurst_jax.models.cascade import StableCascadeUNetConfig
from wurst_jax.models.clip_text import CLIPTextConfig
from wurst_jax.sharding import check_heads

PRESETS = {  # the registry's tensor-parallel head counts (attention levels only)
    "stage_c": (32, 32),
    "stage_c_lite": (24, 24),
    "stage_b": (20, 20),
    "stage_b_lite": (18, 18),  # num_attention_heads (0, 9, 18, 18): levels 0 and 1 have no attention blocks
}


def heads(preset: str) -> tuple[int, ...]:
    config = getattr(StableCascadeUNetConfig, preset)()
    return tuple(registry.get("cascade_unet").heads(config))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model", [2, 4, 8])
def test_check_heads_on_the_released_presets(preset, model):
    assert heads(preset) == PRESETS[preset]
    mesh = wj.make_mesh(data=8 // model, model=model, devices=jax.devices())
    counts = PRESETS[preset]
    if all(h % model == 0 for h in counts):
        check_heads(counts, mesh, "tp", preset)  # divides: no error
        check_heads(counts, mesh, "fsdp", preset)
        return
    with pytest.raises(ValueError) as e:
        check_heads(counts, mesh, "tp", preset)
    message = str(e.value)
    assert (
        f"sharding='tp' on a {model}-way model axis cannot split {preset}'s attention heads {list(counts)}" in message
    )
    assert "or use sharding='fsdp'" in message
    check_heads(counts, mesh, "fsdp", preset)  # other modes never split heads


def test_the_error_names_what_divides():
    mesh = wj.make_mesh(data=4, model=2)
    with pytest.raises(ValueError, match=r"\[18, 18\] \(18 not divisible by 4\); model axis sizes that split every"):
        check_heads(heads("stage_b_lite"), wj.make_mesh(data=2, model=4), "tp", "StableCascadeUNet")
    with pytest.raises(ValueError, match=r"split every count: 2, 3, 6, 9, 18; or use sharding='fsdp'"):
        check_heads(heads("stage_b_lite"), wj.make_mesh(data=1, model=8), "tp", "StableCascadeUNet")
    with pytest.raises(ValueError, match=r"\(20 not divisible by 8\); model axis sizes that split every count: 2, 4"):
        check_heads(heads("stage_b"), wj.make_mesh(data=1, model=8), "tp", "StableCascadeUNet")
    with pytest.raises(ValueError, match=r"\[2, 3\] \(3 not divisible by 2\); none > 1 can"):
        check_heads(heads("tiny_prior"), mesh, "tp", "StableCascadeUNet")  # why the tp tests use mini_prior
    text = tuple(registry.get("text_encoder_projection").heads(CLIPTextConfig.vit_bigg()))
    assert text == (20,)  # both Stable Cascade text encoders: a 4-way model axis splits stage C and them, 8 does not
    check_heads(text, wj.make_mesh(data=2, model=4), "tp", "CLIPTextModelWithProjection")
    with pytest.raises(ValueError, match=r"CLIPTextModelWithProjection's attention heads \[20\]"):
        check_heads(text, wj.make_mesh(data=1, model=8), "tp", "CLIPTextModelWithProjection")
