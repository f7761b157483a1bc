"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny random PyTorch reference models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's backend optimisations (`JAX_DISABLE_MOST_OPTIMIZATIONS`) are chosen per test file: see FAST_COMPILE_FILES.
# Set the variable yourself (0 or 1) to run every file one way.
_XLA_CHOICE = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS")
# the persistent compilation cache is on by default (~/.cache/wurst_jax/jax): tests never write to the user's home,
# and each test compiles what it runs (tests of the cache pass their own folder)
os.environ["WURST_JAX_CACHE_DIR"] = "off"

import dataclasses  # noqa: E402
import functools  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import wurst_jax as wj  # noqa: E402


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Fill every parameter and buffer with random values (diffusers zero-initialises several of them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            if name.endswith("running_var"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def import_torchvision():
    """`import torchvision`, tolerating operators that do not register.

    torchvision 0.28's compiled operators (nms, roi_align, …) do not load beside the CPU torch 2.13 wheel, and
    registering their fake kernels then raises while `torchvision` is imported. The model code the tests compare
    with needs none of them, so only those registrations are skipped.
    """
    import torch.library

    register_fake = torch.library.register_fake

    def tolerant(*args, **kwargs):
        decorate = register_fake(*args, **kwargs)

        def apply(fn):
            try:
                return decorate(fn)
            except RuntimeError:  # "operator torchvision::nms does not exist"
                return fn

        return apply

    torch.library.register_fake = tolerant
    try:
        import torchvision
    finally:
        torch.library.register_fake = register_fake
    return torchvision


def torch_effnet(cfg=None, seed=0):
    """The EfficientNet semantic encoder as diffusers' Würstchen training example defines it, on torchvision."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    tv = import_torchvision()
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    class EfficientNetEncoder(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, c_latent=16, c_cond=1280, effnet="efficientnet_v2_s", mapper_affine=True):
            super().__init__()
            if effnet == "tiny":  # torchvision's EfficientNet on the test table
                cfg = wj.EfficientNetConfig(effnet="tiny")
                setting, c_in = [], cfg.stem
                for kind, expand, kernel, stride, out, layers in cfg.stages:
                    block = FusedMBConvConfig if kind == "fused" else MBConvConfig
                    setting.append(block(expand, kernel, stride, c_in, out, layers))
                    c_in = out
                norm = functools.partial(torch.nn.BatchNorm2d, eps=1e-3)
                self.backbone = EfficientNet(setting, 0.0, last_channel=c_cond, norm_layer=norm).features
            else:
                self.backbone = getattr(tv.models, effnet)().features
            self.mapper = torch.nn.Sequential(
                torch.nn.Conv2d(c_cond, c_latent, kernel_size=1, bias=False),
                torch.nn.BatchNorm2d(c_latent, affine=mapper_affine),
            )

        def forward(self, x):
            return self.mapper(self.backbone(x))

    kw = dataclasses.asdict(cfg or wj.EfficientNetConfig.tiny())
    model = EfficientNetEncoder(**kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # BatchNorm statistics and affine terms that are not identities
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.1)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


try:  # before transformers / diffusers look for it: they import torchvision when it is installed
    import_torchvision()
except ImportError:  # not installed: only the EfficientNet tests need it (.ci/run installs it)
    pass


def torch_prior(cfg=None, seed=0):
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    cfg = cfg or wj.StageCConfig.tiny()
    model = randomize(WuerstchenPrior(**dataclasses.asdict(cfg)), seed)
    # The output divides by |1 - b| + 1e-5: keep b near -1 so rounding is not amplified by a tiny divisor.
    with torch.no_grad():
        model.out[1].weight.mul_(0.25)
        model.out[1].bias[cfg.c_in :] -= 1.0
    return model


def torch_decoder(cfg=None, seed=0):
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt

    kw = {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg or wj.StageBConfig.tiny()).items()
    }
    return randomize(WuerstchenDiffNeXt(**kw), seed, scale=0.1)


def torch_vqgan(cfg=None, seed=0):
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    return randomize(PaellaVQModel(**dataclasses.asdict(cfg or wj.StageAConfig.tiny())), seed)


def torch_clip(cfg=None, seed=0):
    import transformers

    cfg = cfg or wj.CLIPTextConfig.tiny()
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**dataclasses.asdict(cfg)))
    return randomize(model, seed, scale=0.1)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().transpose(0, 2, 3, 1)


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error relative to the output scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- tiny text-to-image checkpoints on disk


def clip_tokenizer(folder):
    """The real CLIP BPE tokenizer (vocabulary from open_clip's wheel, built as open_clip does) saved to `folder`."""
    from wurst_jax.tiny.clip_vocab import build_clip_tokenizer

    return build_clip_tokenizer(folder)


TEXT_CFG = dict(vocab_size=49408, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """diffusers pipelines of tiny random components, saved as `wuerstchen/` and `wuerstchen-prior/` folders.

    Returns (decoder_dir, prior_dir, combined diffusers pipeline).
    """
    from diffusers import (
        DDPMWuerstchenScheduler,
        WuerstchenCombinedPipeline,
        WuerstchenDecoderPipeline,
        WuerstchenPriorPipeline,
    )

    root = tmp_path_factory.mktemp("ckpt")
    tok = clip_tokenizer(root / "tok")
    te_prior = torch_clip(wj.CLIPTextConfig(**TEXT_CFG), seed=1)
    te_dec = torch_clip(wj.CLIPTextConfig(**TEXT_CFG, hidden_act="quick_gelu"), seed=2)
    prior, decoder, vqgan = torch_prior(seed=3), torch_decoder(seed=4), torch_vqgan(seed=5)
    s = DDPMWuerstchenScheduler()
    WuerstchenPriorPipeline(tok, te_prior, prior, s).save_pretrained(root / "wuerstchen-prior")
    WuerstchenDecoderPipeline(tok, te_dec, decoder, s, vqgan).save_pretrained(root / "wuerstchen")
    combined = WuerstchenCombinedPipeline(tok, te_dec, decoder, s, vqgan, tok, te_prior, prior, s)
    combined.set_progress_bar_config(disable=True)
    return root / "wuerstchen", root / "wuerstchen-prior", combined


# ---------------------------------------------------------------- xdist balance

# The files holding the longest tests (CI's --durations), run first. `pytest -n 2` hands tests out in collection
# order, so a minute-long test collected near the end keeps one worker busy while the other has nothing left; whole
# files move, so module-scoped fixtures are still built once per worker.
# Files that compare our programs with each other (sharded vs one device, scanned vs unrolled, resumed vs straight,
# CLI vs pipeline, ...) and never with an outside reference: they run with XLA's backend optimisations off (LLVM
# -O0, no expensive passes), which compiles their programs about 30% faster (the stage B train step: 26 s vs 39 s).
# Every other file (each parity test against diffusers / transformers / torchvision / the original code) runs the
# optimised programs: the -O0 programs round differently, e.g. the v2 pipeline vs
# diffusers: 1.4e-3 max pixel error at -O0, 1.1e-4 optimised. A new file runs optimised unless it is listed here.
FAST_COMPILE_FILES = frozenset(
    {
        "test_batch_generate.py",
        "test_benchmarks.py",
        "test_cascade_inference_scan.py",
        "test_cascade_serving.py",
        "test_cli.py",
        "test_cli_errors.py",
        "test_coldstart.py",
        "test_compilation_cache.py",
        "test_controlnet_pipeline.py",
        "test_gpu_suite.py",
        "test_inference_scan.py",
        "test_interrupt_points.py",
        "test_interrupts.py",
        "test_lora_train_sharded.py",
        "test_pipeline_inputs.py",
        "test_repeats.py",
        "test_samplers.py",
        "test_sequential_offload.py",
        "test_serve.py",
        "test_sharding.py",
        "test_startup.py",
        "test_train.py",
        "test_train_benchmark.py",
        "test_train_cli.py",
        "test_train_data.py",
        "test_warm.py",
    }
)
_XLA_OFF = [_XLA_CHOICE not in (None, "0", "")]  # what jax reads at import (its default: optimised)


@pytest.fixture(autouse=True, scope="module")
def _xla_backend_optimisations(request):
    """The file's choice of FAST_COMPILE_FILES, for this process and the subprocesses its tests start. On a change,
    jax's in-memory caches are cleared so that no program compiled the other way is reused."""
    off = _XLA_OFF[0] if _XLA_CHOICE is not None else request.path.name in FAST_COMPILE_FILES
    if off != _XLA_OFF[0]:
        import jax

        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", off)
        _XLA_OFF[0] = off
    if _XLA_CHOICE is None:
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1" if off else "0"
    yield


SLOW_FILES_FIRST = (
    "test_train_cli.py",
    "test_repeats.py",
    "test_train_benchmark.py",
    "test_train.py",
    "test_batch_generate.py",
    "test_benchmarks.py",
    "test_controlnet.py",
    "test_finetune.py",
    "test_cli.py",
    "test_cascade_unet.py",
    "test_sharding.py",
    "test_samplers.py",
    "test_controlnet_pipeline.py",
    "test_gpu_suite.py",
    "test_cascade_pipeline.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
