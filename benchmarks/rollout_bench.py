"""Rollout and LoRA-sync benchmark: plain diffusers vs. our log-prob rollout, side by side in one run.

    python benchmarks/rollout_bench.py                 # real-size Qwen-Image DiT (20.4B, random bf16) on one GPU
    python benchmarks/rollout_bench.py --family sd3    # real-size SD3.5-Medium MMDiT-X (2.5B, random bf16)
    python benchmarks/rollout_bench.py --tiny [--family sd3]   # the tiny model on the CPU (what CI runs)

The DiT is built with random weights directly on the device (no checkpoint); prompts are random embeddings of a
fixed length (``--text-len``; for SD3 the T5 tokens after CLIP's 77, the negative prompt the same length as SD3
pads it), for Qwen-Image the negative prompt a shorter one (``--neg-len``), as a real " " negative prompt is.
Variants:

* ``diffusers``: the stock diffusers pipeline loop, eager, CFG as diffusers does it (what a user would pick):
  ``QwenImagePipeline`` two forwards (true CFG), ``StableDiffusion3Pipeline`` one batched forward;
* ``ours_nocapture``: our loop (``predict_velocity`` + scheduler step) with ODE steps and no capture;
* ``ours_sde`` / ``ours_cps`` (all steps but the last stochastic) and ``*_window`` (2-step window): our rollout with
  log-probs and trajectory capture, eager;
* ``ours_attn``: ``ours_sde_window`` with batched CFG and the attention backend ``--attn`` (cuDNN first), eager;
* ``ours_opt`` / ``ours_opt_full`` / ``ours_opt_nocapture``: everything on (regional ``torch.compile`` of the
  transformer blocks, batched CFG, ``--attn``, the family's fast attention processor if it has one), with a
  2-step window / every step stochastic / no capture.

``--variants`` run at the batch sizes in ``--full-batches``; the others run ``--core-variants``.

Reported per resolution and batch size: images/s for a full rollout (DiT + our sampling; text encoding and VAE
excluded, the same for every variant), ms per DiT forward (per CFG pass of the batch), achieved TFLOP/s (FLOPs
counted with ``torch.utils.flop_counter.FlopCounterMode``), the fraction of ``--peak-tflops``, peak memory, and
ratios to the diffusers baseline. ``--lora`` adds rank-32 LoRA sync latency (in-memory from GPU and CPU tensors,
disk round trip, plain peft) and sampling speed with the LoRA applied. Results go to ``--out`` as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verl_diffusion_rollout.config import DiffusionSamplingConfig  # noqa: E402
from verl_diffusion_rollout.pipelines.loop import attention_backend, per_sample_generators, rollout_batch  # noqa: E402
from verl_diffusion_rollout.pipelines.qwenimage import QwenImageLogProbPipeline  # noqa: E402
from verl_diffusion_rollout.pipelines.sd3 import StableDiffusion3LogProbPipeline  # noqa: E402
from verl_diffusion_rollout.scheduler import FlowMatchSDEDiscreteScheduler  # noqa: E402

from verl_diffusion_rollout.testing import QWEN_IMAGE_SCHEDULER_CONFIG as QWEN_SCHEDULER  # noqa: E402
from verl_diffusion_rollout.testing import SD3_SCHEDULER_CONFIG as SD3_SCHEDULER  # noqa: E402

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# FlowGRPO's SD3.5 LoRA: the joint attention of every block (not the dual-attention blocks' image-only attn2)
SD3_ATTENTION_PROJECTIONS = [f"attn.{m}" for m in ATTENTION_PROJECTIONS]

# stabilityai/stable-diffusion-3.5-medium transformer/config.json: MMDiT-X, 24 blocks of 24 x 64 heads (1536 wide),
# dual attention (a second, image-only attention) in blocks 0-12, RMS QK-norm; 2.24B parameters.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)


# -- setup ----------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_dit(tiny: bool, device: torch.device, dtype: torch.dtype, num_layers: int = 60):
    """The Qwen-Image DiT with its published config (or the tiny test dims), random weights, built on ``device``."""
    from diffusers import QwenImageTransformer2DModel

    if tiny:
        from verl_diffusion_rollout.testing import TINY_QWENIMAGE_DIMS

        kwargs = dict(TINY_QWENIMAGE_DIMS["transformer"])
    else:
        kwargs = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=128,
                      num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                      axes_dims_rope=(16, 56, 56))
    return _random_dit(QwenImageTransformer2DModel, kwargs, device, dtype)


def build_sd3_dit(tiny: bool, device: torch.device, dtype: torch.dtype, num_layers: int = 24):
    """The SD3.5-Medium MMDiT-X with its published config (or the tiny test dims), random weights, on ``device``."""
    from diffusers import SD3Transformer2DModel

    if tiny:
        from verl_diffusion_rollout.testing import TINY_SD3_DIMS

        kwargs = dict(TINY_SD3_DIMS["transformer"])
    else:
        kwargs = dict(SD35_MEDIUM_TRANSFORMER, num_layers=num_layers)
    return _random_dit(SD3Transformer2DModel, kwargs, device, dtype)


def _random_dit(cls, kwargs: dict, device, dtype):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            dit = cls(**kwargs)
    finally:
        torch.set_default_dtype(default)
    # A transformer-style init keeps many random layers finite in bf16 (default init can overflow).
    with torch.no_grad():
        for module in dit.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.02)
                if module.bias is not None:
                    module.bias.zero_()
    return dit.eval().requires_grad_(False)


def make_env(batch: int, text_len: int, neg_len: int, dim: int, device, dtype, cfg: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    env = {
        "prompt_embeds": torch.randn(batch, text_len, dim, generator=g).to(device, dtype),
        "prompt_embeds_mask": torch.ones(batch, text_len, dtype=torch.long, device=device),
        "negative_prompt_embeds": None,
        "negative_prompt_embeds_mask": None,
    }
    if cfg:
        env["negative_prompt_embeds"] = torch.randn(batch, neg_len, dim, generator=g).to(device, dtype)
        env["negative_prompt_embeds_mask"] = torch.ones(batch, neg_len, dtype=torch.long, device=device)
    return env


def make_sd3_env(batch: int, text_len: int, dit, device, dtype, cfg: bool) -> dict:
    """SD3's denoising environment: 77 CLIP + ``text_len`` T5 tokens (no padding), pooled CLIP embeddings."""
    g = torch.Generator(device="cpu").manual_seed(0)
    length, width, pooled = 77 + text_len, dit.config.joint_attention_dim, dit.config.pooled_projection_dim

    def text():
        return torch.randn(batch, length, width, generator=g).to(device, dtype), torch.randn(
            batch, pooled, generator=g).to(device, dtype)

    env = {"prompt_embeds": None, "pooled_prompt_embeds": None, "negative_prompt_embeds": None,
           "negative_pooled_prompt_embeds": None, "negative_prompt_embeds_mask": None,
           "prompt_embeds_mask": torch.ones(batch, length, dtype=torch.long, device=device)}
    env["prompt_embeds"], env["pooled_prompt_embeds"] = text()
    if cfg:
        env["negative_prompt_embeds"], env["negative_pooled_prompt_embeds"] = text()
        env["negative_prompt_embeds_mask"] = env["prompt_embeds_mask"].clone()
    return env


@contextlib.contextmanager
def fast_attention(dit, fam: "BenchFamily", enabled: bool):
    """The family's fast attention processor (Qwen-Image's joint-attention one; SD3 has none), swapped in for the
    variant and back out."""
    handle = fam.family.use_fast_attention(dit) if enabled else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def joint_attn_processor(dit, enabled: bool):
    """Our compile-friendly Qwen-Image joint-attention processor, swapped in for the variant and back out."""
    return fast_attention(dit, QWEN, enabled)


class _GeluProjEpilogue(torch.nn.Module):
    """Experiment: FeedForward's Linear + tanh-GELU as one cuBLASLt GEMM with a GELU epilogue (inference only)."""

    def __init__(self, gelu):
        super().__init__()
        self.proj = gelu.proj

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        out = torch._addmm_activation(self.proj.bias, flat, self.proj.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def gelu_epilogue(dit, enabled: bool):
    if not enabled:
        yield
        return
    swapped = []
    if not hasattr(dit.transformer_blocks[0], "img_mlp"):
        raise ValueError("the GELU-epilogue experiment swaps Qwen-Image's img_mlp/txt_mlp; this DiT has none")
    for block in dit.transformer_blocks:
        for mlp in (block.img_mlp, block.txt_mlp):
            swapped.append((mlp, mlp.net[0]))
            mlp.net[0] = _GeluProjEpilogue(mlp.net[0])
    try:
        yield
    finally:
        for mlp, original in swapped:
            mlp.net[0] = original


@contextlib.contextmanager
def inductor_tuning(enabled: bool):
    if not enabled:
        yield
        return
    import torch._inductor.config as inductor_config

    previous = inductor_config.coordinate_descent_tuning
    inductor_config.coordinate_descent_tuning = True
    try:
        yield
    finally:
        inductor_config.coordinate_descent_tuning = previous


@contextlib.contextmanager
def compiled_blocks(dit, enabled: bool):
    """Regional compilation: each transformer block through one compiled graph (swapped in, then back out)."""
    if not enabled:
        yield
        return
    original = dit.transformer_blocks
    dit.transformer_blocks = torch.nn.ModuleList([torch.compile(b, dynamic=False) for b in original])
    try:
        yield
    finally:
        dit.transformer_blocks = original


# -- variants ---------------------------------------------------------------------------------------------------


@dataclass
class Setting:
    resolution: int
    batch: int
    steps: int
    cfg: float
    text_len: int
    neg_len: int
    timed_steps: int  # steps actually run; time is scaled to `steps`


def _stock_qwen(dit):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=None,
                             text_encoder=None, tokenizer=None, transformer=dit)


def _stock_sd3(dit):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=dit, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )


def _run_stock_qwen(pipe, env: dict, s: Setting, steps: int, latents=None):
    return pipe(prompt_embeds=env["prompt_embeds"], prompt_embeds_mask=env["prompt_embeds_mask"],
                negative_prompt_embeds=env["negative_prompt_embeds"],
                negative_prompt_embeds_mask=env["negative_prompt_embeds_mask"], true_cfg_scale=s.cfg,
                height=s.resolution, width=s.resolution, num_inference_steps=steps, output_type="latent",
                latents=latents, generator=torch.Generator(device="cpu").manual_seed(0)).images


def _run_stock_sd3(pipe, env: dict, s: Setting, steps: int, latents=None):
    return pipe(prompt_embeds=env["prompt_embeds"], pooled_prompt_embeds=env["pooled_prompt_embeds"],
                negative_prompt_embeds=env["negative_prompt_embeds"],
                negative_pooled_prompt_embeds=env["negative_pooled_prompt_embeds"], guidance_scale=s.cfg,
                height=s.resolution, width=s.resolution, num_inference_steps=steps, output_type="latent",
                latents=latents, generator=torch.Generator(device="cpu").manual_seed(0)).images


def our_sd3_pipeline(dit, attention: str = "default") -> StableDiffusion3LogProbPipeline:
    pipe = StableDiffusion3LogProbPipeline(
        transformer=dit, scheduler=FlowMatchSDEDiscreteScheduler(**SD3_SCHEDULER), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.attention_backend = attention
    return pipe


@dataclass(frozen=True)
class BenchFamily:
    """What the benchmark needs to know about a model family; everything else runs the same code."""

    name: str
    model: str
    tiny_model: str
    build_dit: Callable  # (tiny, device, dtype, num_layers) -> random DiT
    make_env: Callable  # (batch, text_len, neg_len, dit, device, dtype, cfg) -> denoising environment
    our_pipeline: Callable  # (dit, attention) -> our log-prob pipeline without text encoders / VAE
    stock_pipeline: Callable  # (dit) -> the stock diffusers pipeline without text encoders / VAE
    run_stock: Callable  # (pipe, env, setting, steps, latents) -> final latents
    image_seq_len: Callable  # (pipe, latents) -> image tokens (the dynamic-shift input)
    stock_batch_cfg: bool  # how diffusers runs CFG: one batched forward (SD3) or two (Qwen-Image)
    lora_targets: list
    scheduler_config: dict

    @property
    def family(self):
        from verl_diffusion_rollout.pipelines import get_family

        return get_family(self.name)


QWEN = BenchFamily(
    name="qwenimage",
    model="Qwen-Image DiT (60 layers, 24x128 heads, 20.4B, random)",
    tiny_model="tiny Qwen-Image DiT",
    build_dit=lambda tiny, device, dtype, num_layers=60: build_dit(tiny, device, dtype, num_layers),
    make_env=lambda batch, text_len, neg_len, dit, device, dtype, cfg: make_env(
        batch, text_len, neg_len, dit.config.joint_attention_dim, device, dtype, cfg),
    our_pipeline=lambda dit, attention="default": our_pipeline(dit, attention),
    stock_pipeline=_stock_qwen,
    run_stock=_run_stock_qwen,
    image_seq_len=lambda pipe, x: x.shape[1],
    stock_batch_cfg=False,
    lora_targets=ATTENTION_PROJECTIONS,
    scheduler_config=QWEN_SCHEDULER,
)
SD3 = BenchFamily(
    name="sd3",
    model="SD3.5-Medium MMDiT-X (24 layers, 24x64 heads, dual attention 0-12, 2.24B, random)",
    tiny_model="tiny SD3.5 MMDiT-X",
    build_dit=lambda tiny, device, dtype, num_layers=24: build_sd3_dit(tiny, device, dtype, num_layers),
    make_env=lambda batch, text_len, neg_len, dit, device, dtype, cfg: make_sd3_env(
        batch, text_len, dit, device, dtype, cfg),
    our_pipeline=lambda dit, attention="default": our_sd3_pipeline(dit, attention),
    stock_pipeline=_stock_sd3,
    run_stock=_run_stock_sd3,
    image_seq_len=lambda pipe, x: (x.shape[2] // pipe.patch_size) * (x.shape[3] // pipe.patch_size),
    stock_batch_cfg=True,
    lora_targets=SD3_ATTENTION_PROJECTIONS,
    scheduler_config=SD3_SCHEDULER,
)
FAMILIES = {f.name: f for f in (QWEN, SD3)}


def run_diffusers(dit, device, dtype, s: Setting, steps: int, fam: BenchFamily = QWEN) -> float:
    pipe = fam.stock_pipeline(dit)
    pipe.set_progress_bar_config(disable=True)
    env = fam.make_env(s.batch, s.text_len, s.neg_len, dit, device, dtype, s.cfg > 1)
    sync(device)
    start = time.perf_counter()
    fam.run_stock(pipe, env, s, steps)
    sync(device)
    return time.perf_counter() - start


def our_pipeline(dit, attention: str = "default") -> QwenImageLogProbPipeline:
    pipe = QwenImageLogProbPipeline(scheduler=FlowMatchSDEDiscreteScheduler(**QWEN_SCHEDULER), vae=None,
                                    text_encoder=None, tokenizer=None, transformer=dit)
    pipe.set_progress_bar_config(disable=True)
    pipe.attention_backend = attention
    return pipe


def run_nocapture(dit, device, dtype, s: Setting, steps: int, batch_cfg: bool = False, attention: str = "default",
                  fam: BenchFamily = QWEN) -> float:
    """Our building blocks (the family's velocity + Euler step), no log-probs, no trajectory."""
    pipe = fam.our_pipeline(dit, attention)
    env = fam.make_env(s.batch, s.text_len, s.neg_len, dit, device, dtype, s.cfg > 1)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), attention_backend(attention, device):
        x = pipe.prepare_rollout_latents(per_sample_generators(range(s.batch)), s.resolution, s.resolution, device)
        cond = pipe.family.condition(env, guidance_scale=s.cfg, batch_cfg=batch_cfg, dtype=dtype,
                                     height=s.resolution, width=s.resolution, latent_shape=x.shape)
        sched = pipe.request_scheduler(steps, image_seq_len=fam.image_seq_len(pipe, x), device=device)
        for t in sched.timesteps:
            v = pipe.family.velocity(dit, x, t.expand(s.batch), cond)
            x = sched.step(v, t, x).prev_sample
    sync(device)
    return time.perf_counter() - start


def run_ours(dit, device, dtype, s: Setting, steps: int, sde_type: str, window: bool, batch_cfg: bool,
             attention: str = "default", fam: BenchFamily = QWEN) -> float:
    pipe = fam.our_pipeline(dit, attention)
    env = fam.make_env(s.batch, s.text_len, s.neg_len, dit, device, dtype, s.cfg > 1)
    sampling = DiffusionSamplingConfig(
        height=s.resolution, width=s.resolution, num_steps=steps, guidance_scale=s.cfg, sde_type=sde_type,
        noise_level=0.7, batch_cfg=batch_cfg,
        sde_window=[0, 1] if window and steps > 2 else None,
    )
    sync(device)
    start = time.perf_counter()
    traj = pipe.denoise(env, list(range(s.batch)), sampling)
    sync(device)
    elapsed = time.perf_counter() - start
    if not bool(torch.isfinite(traj.latents).all()):
        raise FloatingPointError("non-finite latents")
    return elapsed


def forward_flops(dit, device, dtype, s: Setting, fam: BenchFamily = QWEN) -> float:
    """FLOPs of one conditional DiT forward for one sample (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = fam.our_pipeline(dit)
    env = fam.make_env(1, s.text_len, s.neg_len, dit, device, dtype, False)
    x = pipe.prepare_rollout_latents(per_sample_generators([0]), s.resolution, s.resolution, device)
    cond = pipe.family.condition(env, guidance_scale=1.0, batch_cfg=False, dtype=dtype, height=s.resolution,
                                 width=s.resolution, latent_shape=x.shape)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.family.velocity(dit, x, torch.full((1,), 500.0, device=device), cond)
    return float(counter.get_total_flops())


# -- the matrix --------------------------------------------------------------------------------------------------


def measure(fn: Callable[[int], float], device, repeats: int, steps: int) -> tuple[float, float]:
    """(median seconds of ``steps``-step runs, peak GiB) after a 2-step warm-up (compiles for the same shapes)."""
    fn(2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [fn(steps) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return float(np.median(times)), peak


def run_matrix(dit, device, dtype, args, results: dict) -> None:
    fam = FAMILIES[args.family]
    for res in args.resolutions:
        timed = args.timed_steps_1024 if res >= 1024 else args.steps
        flops = forward_flops(dit, device, dtype, Setting(res, 1, args.steps, args.cfg, args.text_len, args.neg_len, 1),
                              fam)
        results["flops_per_forward"][str(res)] = flops
        for batch in args.batch_sizes:
            s = Setting(res, batch, args.steps, args.cfg, args.text_len, args.neg_len, timed)
            passes = 2 if args.cfg > 1 else 1
            names = args.variants if batch in args.full_batches else args.core_variants
            for name in [v for v in names.split(",") if v]:
                attn, bcfg = args.attn, args.opt_batch_cfg
                # Eager variants run CFG as diffusers does for the family (two forwards for Qwen-Image, one batched
                # forward for SD3), so their ratio to the stock loop measures our sampling, not the CFG layout.
                eager_cfg = fam.stock_batch_cfg
                fn = {
                    "diffusers": lambda k: run_diffusers(dit, device, dtype, s, k, fam),
                    "ours_nocapture": lambda k: run_nocapture(dit, device, dtype, s, k, eager_cfg, fam=fam),
                    "ours_sde": lambda k: run_ours(dit, device, dtype, s, k, "sde", False, eager_cfg, fam=fam),
                    "ours_cps": lambda k: run_ours(dit, device, dtype, s, k, "cps", False, eager_cfg, fam=fam),
                    "ours_sde_window": lambda k: run_ours(dit, device, dtype, s, k, "sde", True, eager_cfg, fam=fam),
                    "ours_cps_window": lambda k: run_ours(dit, device, dtype, s, k, "cps", True, eager_cfg, fam=fam),
                    "ours_attn": lambda k: run_ours(dit, device, dtype, s, k, "sde", True, bcfg, attn, fam),
                    "ours_opt_nocapture": lambda k: run_nocapture(dit, device, dtype, s, k, bcfg, attn, fam),
                    "ours_opt": lambda k: run_ours(dit, device, dtype, s, k, "sde", True, bcfg, attn, fam),
                    "ours_opt_full": lambda k: run_ours(dit, device, dtype, s, k, "sde", False, bcfg, attn, fam),
                    "ours_opt_stock_processor": lambda k: run_ours(dit, device, dtype, s, k, "sde", True, bcfg, attn, fam),
                    "ours_opt_cdt": lambda k: run_ours(dit, device, dtype, s, k, "sde", True, bcfg, attn, fam),
                    "ours_opt_gelu": lambda k: run_ours(dit, device, dtype, s, k, "sde", True, bcfg, attn, fam),
                    "ours_opt_cdt_gelu": lambda k: run_ours(dit, device, dtype, s, k, "sde", True, bcfg, attn, fam),
                }[name]
                opt = name.startswith("ours_opt")
                fast_attn = opt and args.fast_attention and name != "ours_opt_stock_processor"
                row = {"resolution": res, "batch": batch, "variant": name, "timed_steps": timed}
                try:
                    with (
                        fast_attention(dit, fam, fast_attn),
                        gelu_epilogue(dit, "gelu" in name),
                        inductor_tuning("cdt" in name),
                        compiled_blocks(dit, opt and args.compile),
                    ):
                        seconds, peak = measure(fn, device, args.repeats, timed)
                    rollout_s = seconds * args.steps / timed
                    row.update(
                        rollout_s=rollout_s,
                        images_per_s=batch / rollout_s,
                        ms_per_forward=1000 * rollout_s / (args.steps * passes),
                        tflops=flops * batch * passes * args.steps / rollout_s / 1e12,
                        peak_gib=peak,
                    )
                    row["ceiling_fraction"] = row["tflops"] / args.peak_tflops
                except Exception as err:  # keep the other measurements
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                results["rollout"].append(row)
                print(json.dumps(row), flush=True)
                gc.collect()


# -- LoRA -------------------------------------------------------------------------------------------------------


def lora_bench(dit, device, dtype, args, results: dict) -> None:
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    from verl_diffusion_rollout.lora import LoRASpec, LoRASync, merge_weight

    fam = FAMILIES[args.family]
    rank = args.lora_rank
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=fam.lora_targets)
    spec = LoRASpec.from_model(dit, config)
    g = torch.Generator(device="cpu").manual_seed(0)
    loras = [
        {name: (torch.randn(shape, generator=g) * 0.01).to(device, dtype) for name, shape in spec.shapes.items()}
        for _ in range(2)
    ]
    out: dict[str, Any] = {"rank": rank, "modules": len(spec.modules), "tensors": len(spec.shapes),
                           "params": int(sum(np.prod(s) for s in spec.shapes.values())),
                           "mib": sum(int(np.prod(s)) for s in spec.shapes.values()) * 2 / 2**20}
    base_weights = {n: dit.get_submodule(n).weight.detach().clone() for n in spec.modules[:4]}

    s = Setting(args.lora_resolution, args.lora_batch, args.steps, args.cfg, args.text_len, args.neg_len, args.steps)
    fwd = lambda k: run_nocapture(dit, device, dtype, s, k, True, args.attn, fam)  # noqa: E731
    out["rollout_s_no_lora"], _ = measure(fwd, device, args.repeats, args.lora_steps)
    out["rollout_s_no_lora_again"], _ = measure(fwd, device, args.repeats, args.lora_steps)

    merged = LoRASync(dit, spec, config, merged=True)

    def sync_from(tensors: dict[str, torch.Tensor]) -> float:
        sync(device)
        start = time.perf_counter()
        merged.stage(tensors.items())
        merged.commit()
        sync(device)
        return time.perf_counter() - start

    times_gpu = [sync_from(loras[i % 2]) for i in range(args.lora_syncs)]
    out["merge_extra_gib"] = merged.extra_bytes / 2**30
    out["sync_ms_from_gpu_median"] = 1000 * float(np.median(times_gpu[2:]))
    cpu_loras = [{k: v.cpu() for k, v in lora.items()} for lora in loras]
    times_cpu = [sync_from(cpu_loras[i % 2]) for i in range(8)]
    out["sync_ms_from_cpu_median"] = 1000 * float(np.median(times_cpu[2:]))
    pinned = [{k: v.pin_memory() for k, v in lora.items()} for lora in cpu_loras] if device.type == "cuda" else cpu_loras
    times_pinned = [sync_from(pinned[i % 2]) for i in range(8)]
    out["sync_ms_from_pinned_cpu_median"] = 1000 * float(np.median(times_pinned[2:]))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lora.safetensors")
        disk = []
        for i in range(4):
            sync(device)
            start = time.perf_counter()
            save_file({k: v.contiguous() for k, v in loras[i % 2].items()}, path)
            loaded = load_file(path, device=str(device))
            merged.stage(loaded.items())
            merged.commit()
            sync(device)
            disk.append(time.perf_counter() - start)
        out["sync_ms_disk_roundtrip_median"] = 1000 * float(np.median(disk[1:]))

    # Exactness over many syncs: after N alternating syncs, weights equal one sync of the last LoRA.
    # The disk round trips synced loras[1] last; its merge from the untouched base weights, computed once.
    last = loras[1]
    out["no_drift_after_syncs"] = all(
        torch.equal(
            merged.layers[n].merged_weight,
            merge_weight(merged.layers[n].get_base_layer().weight, last[f"{n}.lora_A.weight"],
                         last[f"{n}.lora_B.weight"], spec.scale),
        )
        for n in spec.modules[:8]
    )
    out["syncs_checked"] = args.lora_syncs + 12
    out["rollout_s_merged_lora"], _ = measure(fwd, device, args.repeats, args.lora_steps)
    out["merged_vs_no_lora"] = out["rollout_s_merged_lora"] / out["rollout_s_no_lora"]
    out["no_lora_repeat_spread"] = out["rollout_s_no_lora_again"] / out["rollout_s_no_lora"]
    merged.remove()
    out["base_restored_exactly"] = all(torch.equal(base_weights[n], dit.get_submodule(n).weight) for n in base_weights)
    del merged
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # Plain peft: adapter layers (unmerged), state dict loaded with set_peft_model_state_dict.
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    inject_adapter_in_model(config, dit)
    peft_state = {k: v for k, v in loras[0].items()}
    peft_times = []
    for i in range(6):
        sync(device)
        start = time.perf_counter()
        set_peft_model_state_dict(dit, loras[i % 2] if i else peft_state)
        sync(device)
        peft_times.append(time.perf_counter() - start)
    out["peft_set_state_dict_ms_median"] = 1000 * float(np.median(peft_times[1:]))
    out["rollout_s_peft_unmerged"], _ = measure(fwd, device, args.repeats, args.lora_steps)
    out["peft_unmerged_vs_no_lora"] = out["rollout_s_peft_unmerged"] / out["rollout_s_no_lora"]
    results["lora"] = out
    print(json.dumps({"lora": out}), flush=True)


# -- numerics ---------------------------------------------------------------------------------------------------


def numerics(device, args, results: dict) -> None:
    """ODE exactness against diffusers (its Euler step, and the whole stock pipeline loop on a 2-layer DiT of the real
    width), and rollout-vs-replay log-prob differences, in bf16 and fp32."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from verl_diffusion_rollout.sde import sde_step_with_logprob
    from verl_diffusion_rollout.trainer.replay import compute_log_probs, trainable_steps

    fam = FAMILIES[args.family]
    out = {}
    res = 64 if args.tiny else 256
    for dtype in (torch.bfloat16, torch.float32):
        tag = str(dtype).split(".")[-1]
        ref = FlowMatchEulerDiscreteScheduler(**fam.scheduler_config)
        if fam is QWEN:
            ref.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10), mu=0.8, device=device)
            shape = (4, 256, 64)
        else:
            ref.set_timesteps(10, device=device)
            shape = (4, 16, 32, 32)
        x = torch.randn(*shape, device=device).to(dtype)
        exact = True
        for i, t in enumerate(ref.timesteps):
            v = torch.randn(*shape, device=device).to(dtype)
            expected = ref.step(v, t, x, return_dict=False)[0]
            got = sde_step_with_logprob(v, x, ref.sigmas[i].cpu(), ref.sigmas[i + 1].cpu(), sde_type="ode").prev_sample
            exact &= torch.equal(expected, got)
            x = expected
        out[f"ode_bit_exact_{tag}"] = bool(exact)

        dit = fam.build_dit(args.tiny, device, dtype, num_layers=2)  # real width, 2 layers (or the tiny model)

        # The whole ODE rollout against the stock pipeline loop (CFG as diffusers runs it, PyTorch's attention choice).
        s = Setting(res, 2, 4, args.cfg, args.text_len, args.neg_len, 4)
        env = fam.make_env(2, args.text_len, args.neg_len, dit, device, dtype, True)
        pipe = fam.our_pipeline(dit, "default")
        init = pipe.prepare_rollout_latents(per_sample_generators([5, 6]), res, res, device).to(dtype)
        stock = fam.stock_pipeline(dit)
        stock.set_progress_bar_config(disable=True)
        expected = fam.run_stock(stock, env, s, 4, latents=init)
        ode = DiffusionSamplingConfig(height=res, width=res, num_steps=4, guidance_scale=args.cfg, sde_type="ode",
                                      batch_cfg=fam.stock_batch_cfg)
        got = pipe.denoise(env, [5, 6], ode, latents=init.float()).final
        out[f"pipeline_ode_bit_exact_{tag}"] = bool(torch.equal(got, expected.float()))

        # Replay: same kernels for rollout and replay.
        pipe = fam.our_pipeline(dit, args.attn)
        for compiled in ((False, True) if (device.type == "cuda" and args.compile) else (False,)):
            with compiled_blocks(dit, compiled):
                for sde_type in ("sde", "cps"):
                    sampling = DiffusionSamplingConfig(height=res, width=res, num_steps=6, guidance_scale=4.0,
                                                       sde_type=sde_type, noise_level=0.9, sde_window=[1, 3])
                    env = fam.make_env(4, args.text_len, args.neg_len, dit, device, dtype, True)
                    traj = pipe.denoise(env, [1, 2, 3, 4], sampling)
                    batch = rollout_batch(traj, torch.zeros(4, 3, 1, 1), env, family=fam.name, seeds=[1, 2, 3, 4],
                                          prompts=["x"] * 4, sampling=sampling, timings={})
                    steps = trainable_steps(batch)
                    with torch.no_grad():
                        replayed = compute_log_probs(dit, batch, steps, attention=args.attn).cpu()
                    diff = (replayed - traj.log_probs[:, steps]).abs().max().item()
                    key = f"replay_max_abs_diff_{sde_type}_{tag}{'_compiled' if compiled else ''}"
                    out[key] = diff
        del dit, pipe, stock
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["numerics"] = out
    print(json.dumps({"numerics": out}), flush=True)


# -- reporting ----------------------------------------------------------------------------------------------------


def write_report(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{results['meta']['device_tag']}_{results['meta']['date']}"
    if results["meta"].get("family", "qwenimage") != "qwenimage":
        stem += f"_{results['meta']['family']}"
    json_path = out_dir / f"{stem}.json"
    md_path = out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=2))
    md_path.write_text(markdown(results))
    return json_path, md_path


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# Rollout benchmark: {meta['device']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['model']}, {meta['dtype']}, "
        f"{meta['steps']} steps, {meta.get('cfg_style', 'true CFG')} {meta['cfg']}, {meta.get('text_desc', '')}"
        f". Images/s count the DiT and our sampling (text encoder and VAE excluded, the same for every variant). "
        f"Ceiling: {meta['peak_tflops']} TFLOP/s bf16. Command: `{meta['command']}`",
        "",
    ]
    flops = results.get("flops_per_forward", {})
    if flops:
        lines.append("FLOPs per DiT forward (one sample, one CFG pass): " + ", ".join(
            f"{r}px {f / 1e12:.2f} TFLOP" for r, f in flops.items()))
        lines.append("")
    rows = results.get("rollout", [])
    base = {(r["resolution"], r["batch"]): r for r in rows if r["variant"] == "diffusers" and "error" not in r}
    lines += [
        "| res | batch | variant | img/s | ms/forward | TFLOP/s | of ceiling | peak GiB | vs diffusers |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['resolution']} | {r['batch']} | {r['variant']} | error: {r['error'][:60]} | | | | | |")
            continue
        b = base.get((r["resolution"], r["batch"]))
        ratio = f"{r['images_per_s'] / b['images_per_s']:.2f}x" if b else ""
        lines.append(
            f"| {r['resolution']} | {r['batch']} | {r['variant']} | {r['images_per_s']:.3f} | {r['ms_per_forward']:.1f} | "
            f"{r['tflops']:.0f} | {100 * r['ceiling_fraction']:.0f}% | {r['peak_gib']:.1f} | {ratio} |"
        )
    if "lora" in results:
        lo = results["lora"]
        lines += [
            "",
            f"## LoRA sync (rank {lo['rank']}, {lo['modules']} attention projections, {lo['tensors']} tensors, "
            f"{lo['mib']:.0f} MiB)",
            "",
            "| path | ms |",
            "| --- | ---: |",
            f"| in-memory, merged, from GPU tensors | {lo['sync_ms_from_gpu_median']:.1f} |",
            f"| in-memory, merged, from CPU tensors | {lo['sync_ms_from_cpu_median']:.1f} |",
            f"| in-memory, merged, from pinned CPU tensors | {lo['sync_ms_from_pinned_cpu_median']:.1f} |",
            f"| save to disk + load + merge | {lo['sync_ms_disk_roundtrip_median']:.1f} |",
            f"| plain peft set_peft_model_state_dict (GPU tensors, unmerged) | {lo['peft_set_state_dict_ms_median']:.1f} |",
            "",
            f"Sampling time with the merged LoRA / without LoRA: {lo['merged_vs_no_lora']:.3f} (two runs without LoRA: "
            f"{lo['no_lora_repeat_spread']:.3f}); with peft's unmerged "
            f"adapter: {lo['peft_unmerged_vs_no_lora']:.3f}. Base copy kept for exact re-merging: "
            f"{lo['merge_extra_gib']:.2f} GiB. Weights after {lo['syncs_checked']} syncs equal one sync of the same LoRA: "
            f"{lo['no_drift_after_syncs']}; base restored exactly: {lo['base_restored_exactly']}.",
        ]
    if "numerics" in results:
        lines += ["", "## Numerics", ""] + [f"- {k}: {v}" for k, v in results["numerics"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU (a smoke run, as CI does)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwenimage",
                        help="model family: the Qwen-Image DiT or the SD3.5-Medium MMDiT-X")
    parser.add_argument("--device", default=None)
    parser.add_argument("--resolutions", type=int, nargs="+", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timed-steps-1024", type=int, default=10, help="steps run at >= 1024px (time scaled to --steps)")
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--text-len", type=int, default=64, help="prompt tokens (SD3: T5 tokens after CLIP's 77)")
    parser.add_argument("--neg-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default="diffusers,ours_nocapture,ours_sde,ours_cps,ours_sde_window,ours_cps_window,ours_attn,ours_opt_nocapture,ours_opt,ours_opt_full")
    parser.add_argument("--core-variants", default="diffusers,ours_nocapture,ours_sde_window,ours_opt_nocapture,ours_opt")
    parser.add_argument("--full-batches", type=int, nargs="*", default=[16])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--attn", default="auto", help="attention backend of ours_attn/ours_opt (auto: cuDNN first)")
    parser.add_argument("--opt-batch-cfg", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fast-attention", action=argparse.BooleanOptionalAction, default=True,
                        help="our joint-attention processor (real-valued RoPE) in the ours_opt variants")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--lora-batch", type=int, default=8)
    parser.add_argument("--lora-resolution", type=int, default=512)
    parser.add_argument("--lora-syncs", type=int, default=200)
    parser.add_argument("--lora-steps", type=int, default=4, help="sampling steps timed with and without the LoRA")
    parser.add_argument("--numerics", action="store_true")
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.resolutions is None:
        args.resolutions = [64] if args.tiny else [512, 1024]
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.tiny:
        args.text_len, args.neg_len = min(args.text_len, 16), min(args.neg_len, 4)
        args.lora_resolution, args.lora_rank, args.lora_syncs = 64, 4, 12
    torch.backends.cuda.matmul.allow_tf32 = True
    import diffusers

    fam = FAMILIES[args.family]
    if fam is QWEN:
        text_desc = f"prompt {args.text_len} tokens, negative {args.neg_len} tokens"
    else:
        text_desc = f"prompt and negative 77 CLIP + {args.text_len} T5 tokens"
    results: dict[str, Any] = {
        "meta": {
            "family": fam.name,
            "cfg_style": "true CFG" if fam is QWEN else "CFG",
            "text_desc": text_desc,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "device_tag": (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu").replace(" ", "-"),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "model": fam.tiny_model if args.tiny else fam.model,
            "dtype": str(dtype).split(".")[-1],
            "steps": args.steps,
            "cfg": args.cfg,
            "text_len": args.text_len,
            "neg_len": args.neg_len,
            "peak_tflops": args.peak_tflops,
            "compile": args.compile,
            "attn": args.attn,
            "command": " ".join(sys.argv),
        },
        "flops_per_forward": {},
        "rollout": [],
    }
    if args.numerics:
        numerics(device, args, results)
    dit = None
    if not args.skip_matrix or args.lora:
        start = time.perf_counter()
        dit = fam.build_dit(args.tiny, device, dtype)
        results["meta"]["params_b"] = sum(p.numel() for p in dit.parameters()) / 1e9
        results["meta"]["build_s"] = time.perf_counter() - start
        print(json.dumps({"built": results["meta"]["params_b"], "s": results["meta"]["build_s"]}), flush=True)
    if not args.skip_matrix:
        run_matrix(dit, device, dtype, args, results)
    if args.lora:
        lora_bench(dit, device, dtype, args, results)
    json_path, md_path = write_report(results, Path(args.out))
    print(markdown(results))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
