"""Whole-step FlowGRPO benchmark: rollout -> rewards -> update -> (no) sync, with the recipe's own trainer.

    python benchmarks/step_bench.py                      # real-size Qwen-Image (random bf16) on one GPU
    python benchmarks/step_bench.py --family sd3         # real-size SD3.5-Medium (random bf16)
    python benchmarks/step_bench.py --tiny [--family sd3]   # the tiny model on the CPU (what CI runs)

What runs: the shipped GPU recipe (``flowgrpo_qwenimage`` / ``flowgrpo_sd35m``; ``flowgrpo_tiny`` /
``flowgrpo_sd3_tiny`` with ``--tiny``) through :class:`~verl_diffusion_rollout.trainer.flowgrpo.FlowGRPOTrainer`,
the same object ``python -m verl_diffusion_rollout.main_flowgrpo`` builds, on a model folder written here:

* real size: the published DiT and VAE configs with random bf16 weights, and a text encoder of the real width
  with ``--text-layers`` layers (Qwen2.5-VL-7B's text model for Qwen-Image; CLIP-L, CLIP-G and T5-XXL for SD3.5),
  saved with ``save_pretrained`` under ``--model-dir`` and loaded by the recipe like a downloaded checkpoint. The
  text encoder's missing layers can be stood for by an allocation of their size on the GPU
  (``--pad-text-encoder``), so the measured peak memory is the full model's;
* ``--tiny``: the tiny offline test model of the family.

The reward is JPEG compressibility (no reward model is downloaded), or with ``--reward-model qwen3_vl_8b`` (the
default of ``--preset verl_omni``) the ``vlm_ocr`` reward of a colocated vision-language model of Qwen3-VL-8B-Instruct's
architecture and size (random bf16 weights, saved once under ``--model-dir``), scoring every image on the same GPU
while the next forward batch samples; its time is in the step. Phases of ``--samples`` samples per step (groups of
the recipe's ``rollout.n``) run ``--steps`` steps each on one loaded model. ``--variants`` repeats the run with other
settings (forward batch 4/8/16, gradient checkpointing on/off, of N blocks or planned from the GPU's memory
(``ckpt_auto``, the Qwen-Image recipe's setting), a partitioner activation budget, CFG batched or as two forwards,
unmerged LoRA...), each on a fresh trainer that compiles as a fresh process would; every
variant and every run share one compile cache (``--compile-cache-dir``), so a second run's first step shows the
warm-cache compile cost.

``--preset verl_omni`` is verl-omni's Qwen-Image job: r64 / alpha 128 on its twelve projections (joint attention and
both MLPs), 16 samples per prompt, 512px, 10 steps, CFG 4, a 2-step SDE window in [0, 5), noise 1.2, half the
step's prompts per optimizer step, ``--prompts-per-step`` prompts (16 by default; verl-omni uses 32).

Reported per step: rollout / reward / train / mode-switch seconds (the trainer's ``switch_s``: the merged weights
re-derived after each optimizer step; there is no separate LoRA sync, the rollout samples with the trained module
itself), images/s per GPU for the whole step, the fraction of the 790 TFLOP/s bf16 matrix rate per phase (FLOPs of
the transformer counted on a meta-device copy), peak GPU memory, host RSS, compile-cache hits and misses, and the
pre-update log-prob gap. Per variant and batch size: the first step against the steady state (the mean of the steps
after the first ``--warmup-steps``, 2 by default; the table says how many were averaged). ``--profile`` runs one
more step per variant with the in-trainer rollout under ``torch.profiler`` and writes its top-ops table next to the
results. ``--resume`` continues each variant's run from its last checkpoint under ``--work-dir`` and writes one
after every step (outside the timed step), so a run longer than one command goes on in the next (rows carry the
run's ``rl_step``); ``--budget-s`` starts no step that would end (estimated from the last one) past that many
seconds after the command's start, so a command under a time limit stops between steps with complete results.
``--gpu-memory-gib`` caps PyTorch's allocator (``set_per_process_memory_fraction``) to run as a smaller GPU would.
Results: ``--out`` (JSON and Markdown with device, date, versions and the command).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernel_breakdown  # noqa: E402
import verl_diffusion_rollout  # noqa: E402,F401  (registers the rollout and the config resolvers)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
RECIPES = {("qwenimage", False): "flowgrpo_qwenimage", ("qwenimage", True): "flowgrpo_tiny",
           ("sd3", False): "flowgrpo_sd35m", ("sd3", True): "flowgrpo_sd3_tiny"}
# Named setting changes, each a list of Hydra overrides on top of the recipe.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "unmerged": ["actor_rollout_ref.rollout.lora.merge=false"],
    "micro2": ["actor_rollout_ref.actor.micro_batch_size=2"],
    "micro4": ["actor_rollout_ref.actor.micro_batch_size=4"],
    "micro8": ["actor_rollout_ref.actor.micro_batch_size=8"],
    # the rollout's forward batch is the update's replay batch (exactness): 16 samples sampled and replayed together
    "micro16": ["actor_rollout_ref.actor.micro_batch_size=16"],
    "no_ckpt": ["actor_rollout_ref.actor.gradient_checkpointing=false", "actor_rollout_ref.actor.checkpoint_blocks=null"],
    "ckpt": ["actor_rollout_ref.actor.gradient_checkpointing=true"],
    # every block recomputed (the GPU recipes' setting before checkpoint_blocks=auto)
    "ckpt_all": ["actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_blocks=null"],
    # as few recomputed blocks as fit the GPU's memory, chosen at every forward (actor.checkpoint_blocks=auto)
    "ckpt_auto": ["actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_blocks=auto"],
    "micro8_no_ckpt": ["actor_rollout_ref.actor.micro_batch_size=8",
                       "actor_rollout_ref.actor.gradient_checkpointing=false",
                       "actor_rollout_ref.actor.checkpoint_blocks=null"],
    # CFG as two forwards (conditional, unconditional) in the rollout and therefore in the replay
    "cfg_separate": ["actor_rollout_ref.rollout.sampling.batch_cfg=false"],
    "eager": ["actor_rollout_ref.rollout.compile=false"],
    "recompute": ["actor_rollout_ref.actor.recompute_old_log_probs=true"],
}


def variant_overrides(name: str) -> list[str]:
    """The Hydra overrides of a variant: ``+``-joined parts, each a key of ``VARIANTS``, ``ckpt<N>`` (gradient
    checkpointing of the first N transformer blocks only, the rest keeping their activations) or ``amb<P>`` (no
    gradient checkpointing; the compiled blocks keep P% of their activations for backward and recompute the rest:
    ``actor.activation_memory_budget``), e.g. ``micro8+ckpt40``, ``amb30``. ``KeyError`` naming the unknown part."""
    overrides: list[str] = []
    for part in name.split("+"):
        if part in VARIANTS:
            overrides += VARIANTS[part]
        elif part.startswith("ckpt") and part[4:].isdigit():
            overrides += ["actor_rollout_ref.actor.gradient_checkpointing=true",
                          f"actor_rollout_ref.actor.checkpoint_blocks={int(part[4:])}"]
        elif part.startswith("amb") and part[3:].isdigit() and int(part[3:]) <= 100:
            overrides += ["actor_rollout_ref.actor.gradient_checkpointing=false",
                          "actor_rollout_ref.actor.checkpoint_blocks=null",
                          f"actor_rollout_ref.actor.activation_memory_budget={int(part[3:]) / 100:g}"]
        else:
            raise KeyError(f"unknown variant part {part!r} of {name!r}; known: {sorted(VARIANTS)}, ckpt<N> or "
                           "amb<P> (P in 0..100)")
    return overrides
WORDS = "a an the red green blue cat dog photo of on in with sky city tree house car flower bird".split()
VERL_OMNI_IMG_PER_GPU_S = 0.305  # verl-omni docs/algo/performance.md: Qwen-Image LoRA, 4 x H800, 32 x 16 per step


# -- model folders ------------------------------------------------------------------------------------------------


def _on_device(device: torch.device, dtype: torch.dtype):
    """Build modules directly on ``device`` in ``dtype`` (random init, no host copy)."""

    class _Ctx:
        def __enter__(self):
            self.default = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            self.dev = torch.device(device)
            self.dev.__enter__()

        def __exit__(self, *exc):
            self.dev.__exit__(*exc)
            torch.set_default_dtype(self.default)

    return _Ctx()


def _init_linears(module: torch.nn.Module) -> None:
    """A transformer-style init (N(0, 0.02), zero bias) keeps deep random bf16 stacks finite."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, 0.02)
                if m.bias is not None:
                    m.bias.zero_()


def build_real_qwenimage(out: Path, text_layers: int, dit_layers: int, device: torch.device) -> dict[str, Any]:
    """Qwen-Image at its published size (DiT 60 x 3072, Wan-2.1 VAE) with random bf16 weights; the text encoder is
    Qwen2.5-VL-7B's text model (3584 wide, 28 heads, 4 KV heads, vocabulary 152064) with ``text_layers`` layers
    and a one-block vision tower (text-to-image never runs it). The tokenizer is the tiny test tokenizer (the real
    one is a download); prompts are tokenized to a few tokens per word."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from rollout_bench import build_dit
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from verl_diffusion_rollout.testing import QWEN_IMAGE_SCHEDULER_CONFIG, build_tiny_tokenizer

    dtype = torch.bfloat16
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                            "<|vision_end|>", "<|image_pad|>")}
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers, num_attention_heads=28,
                num_key_value_heads=4, rope_theta=1000000.0, vocab_size=152064, max_position_embeddings=128000,
                rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={"depth": 1, "hidden_size": 64, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 3584},
        hidden_size=3584, vocab_size=152064, vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|image_pad|>"],
        image_token_id=ids["<|image_pad|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    with _on_device(device, dtype):
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        vae = AutoencoderKLQwenImage()
    _init_linears(text_encoder)
    dit = build_dit(False, device, dtype, num_layers=dit_layers)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=dit)
    layer_bytes = _bytes(text_encoder.model.language_model.layers[0])
    pipe.save_pretrained(out)
    return {"text_encoder": f"Qwen2.5-VL-7B text model, {text_layers} of 28 layers", "text_layer_bytes": layer_bytes,
            "text_layers_full": 28, "dit_params_b": _params(dit) / 1e9, "text_params_b": _params(text_encoder) / 1e9}


def build_real_sd3(out: Path, text_layers: int, dit_layers: int, device: torch.device) -> dict[str, Any]:
    """SD3.5-Medium at its published size (MMDiT-X 24 x 1536, SD3 VAE) with random bf16 weights; CLIP-L and
    CLIP-G at full size, T5-XXL (4096 wide) with ``text_layers`` layers; tiny test tokenizers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from rollout_bench import build_sd3_dit
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from verl_diffusion_rollout.testing import SD3_SCHEDULER_CONFIG, build_tiny_clip_tokenizer, build_tiny_t5_tokenizer

    dtype = torch.bfloat16
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu",
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    t5 = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=text_layers, num_heads=64, vocab_size=32128,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0)
    with _on_device(device, dtype):
        enc1, enc2 = CLIPTextModelWithProjection(clip_l).eval(), CLIPTextModelWithProjection(clip_g).eval()
        enc3 = T5EncoderModel(t5).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                            scaling_factor=1.5305)
    for m in (enc1, enc2, enc3):
        _init_linears(m)
    dit = build_sd3_dit(False, device, dtype, num_layers=dit_layers)
    pipe = StableDiffusion3Pipeline(
        transformer=dit, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), vae=vae,
        text_encoder=enc1, tokenizer=build_tiny_clip_tokenizer(model_max_length=77), text_encoder_2=enc2,
        tokenizer_2=build_tiny_clip_tokenizer(model_max_length=77), text_encoder_3=enc3,
        tokenizer_3=build_tiny_t5_tokenizer(),
    )
    layer_bytes = _bytes(enc3.encoder.block[0])
    pipe.save_pretrained(out)
    return {"text_encoder": f"CLIP-L, CLIP-G, T5-XXL with {text_layers} of 24 layers", "text_layer_bytes": layer_bytes,
            "text_layers_full": 24, "dit_params_b": _params(dit) / 1e9,
            "text_params_b": sum(_params(m) for m in (enc1, enc2, enc3)) / 1e9}


# Qwen/Qwen3-VL-8B-Instruct config.json, transcribed (verl-omni's colocated OCR reward model is of this size).
QWEN3_VL_8B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=5000000.0,
                        max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
                        rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                        tie_word_embeddings=False)
QWEN3_VL_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                          patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                          deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh", in_channels=3)


def reward_model_folder(args) -> tuple[str, dict[str, Any]]:
    """The VLM reward's folder: Qwen3-VL-8B-Instruct's architecture and size with random bf16 weights (the tiny
    Qwen3-VL with ``--tiny``), built once under ``--model-dir`` and loaded by the reward like a download."""
    from verl_diffusion_rollout.testing import make_qwen3_vl

    if args.tiny:
        out = Path(args.work_dir) / "tiny_qwen3_vl"
        if not (out / "config.json").is_file():
            make_qwen3_vl(out)
        return str(out), {"description": "tiny Qwen3-VL (test config)"}
    out = Path(args.model_dir) / "qwen3_vl_8b"
    info_file = out / "step_bench_model.json"
    if info_file.is_file():
        return str(out), json.loads(info_file.read_text())
    start = time.perf_counter()
    make_qwen3_vl(out, text=QWEN3_VL_8B_TEXT, vision=QWEN3_VL_8B_VISION, dtype=torch.bfloat16, device="cuda",
                  init=_init_linears, min_pixels=256 * 256)
    params = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2  # bf16: 2 bytes a parameter
    info = {"description": f"Qwen3-VL-8B-Instruct architecture, {params / 1e9:.2f}B random bf16 weights",
            "params_b": params / 1e9, "build_and_save_s": time.perf_counter() - start}
    gc.collect()
    torch.cuda.empty_cache()
    info_file.write_text(json.dumps(info))
    print(json.dumps({"reward_model_folder": str(out), **info}), flush=True)
    return str(out), info


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def model_folder(args) -> tuple[str, dict[str, Any]]:
    """The model folder the recipe loads, and what it holds."""
    if args.model_path:
        return args.model_path, {"text_encoder": "as in the folder"}
    if args.tiny:
        from verl_diffusion_rollout.testing import tiny_qwenimage_path, tiny_sd3_path

        path = tiny_qwenimage_path() if args.family == "qwenimage" else tiny_sd3_path()
        return path, {"text_encoder": "tiny test model"}
    out = Path(args.model_dir) / args.family
    info_file = out / "step_bench_model.json"
    wanted = {"text_layers": args.text_layers, "dit_layers": args.dit_layers}
    if info_file.is_file() and all(json.loads(info_file.read_text()).get(k) == v for k, v in wanted.items()):
        return str(out), json.loads(info_file.read_text())
    start = time.perf_counter()
    build = build_real_qwenimage if args.family == "qwenimage" else build_real_sd3
    info = build(out, args.text_layers, args.dit_layers, torch.device("cuda"))
    info.update(wanted, build_and_save_s=time.perf_counter() - start)
    gc.collect()
    torch.cuda.empty_cache()
    info_file.write_text(json.dumps(info))
    print(json.dumps({"model_folder": str(out), **info}), flush=True)
    return str(out), info


# -- presets, rewards, FLOPs ----------------------------------------------------------------------------------------

# verl-omni's Qwen-Image LoRA recipe (verl examples/flowgrpo_trainer/run_flowgrpo.sh): r64 / alpha 128 on the joint
# attention projections and both streams' MLPs.
VERL_OMNI_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
PRESETS: dict[str, list[str]] = {
    "none": [],
    # verl-omni's configuration: 16 per prompt, 512px, 10 steps, CFG 4, 2-step SDE window in [0, 5), noise 1.2
    "verl_omni": [
        "actor_rollout_ref.model.lora_rank=64",
        "actor_rollout_ref.model.lora_alpha=128",
        f"actor_rollout_ref.model.target_modules=[{','.join(VERL_OMNI_TARGETS)}]",
        "actor_rollout_ref.rollout.n=16",
        "actor_rollout_ref.rollout.sampling.height=512",
        "actor_rollout_ref.rollout.sampling.width=512",
        "actor_rollout_ref.rollout.sampling.num_steps=10",
        "actor_rollout_ref.rollout.sampling.guidance_scale=4.0",
        "actor_rollout_ref.rollout.sampling.sde_window_size=2",
        "actor_rollout_ref.rollout.sampling.sde_window_range=[0,5]",
        "actor_rollout_ref.rollout.sampling.noise_level=1.2",
    ],
}
MATRIX_TFLOPS = 790.0  # H100/H200 dense bf16 matrix rate


def reward_overrides(args) -> list[str]:
    """JPEG compressibility (free), or the colocated VLM reward of a model folder (``--reward-model``)."""
    if not args.reward_model_path:
        return ["~reward.functions", "+reward.functions={jpeg_compressibility: 1.0}", "~reward.options",
                "+reward.options={}"]
    device = "cpu" if args.tiny else "cuda"
    return ["~reward.functions", "+reward.functions={vlm_ocr: 1.0}", "~reward.options",
            f"+reward.options={{vlm_ocr: {{model_path: {args.reward_model_path}, device: {device}, "
            f"batch_size: {args.reward_batch}}}}}"]


def _to_meta(obj: Any) -> Any:
    """Tensors (also inside dataclasses, lists, tuples) moved to the meta device; everything else as is."""

    if isinstance(obj, torch.Tensor):
        return obj.to("meta")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_meta(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_meta(v) for v in obj)
    return obj


def transformer_flops(transformer: torch.nn.Module, batch) -> dict[str, float]:
    """FLOPs of one CFG pass of the transformer for one sample of ``batch`` (a RolloutBatch): forward, and the
    backward to the inputs with frozen base weights (what the LoRA update runs; LoRA's own low-rank products are
    left out), counted with ``FlopCounterMode`` on a meta-device copy built from the model's config (no memory,
    no compute). Text at the batch's padded prompt length."""
    import peft  # noqa: F401  (a peft-wrapped transformer is still its diffusers class)
    from torch.utils.flop_counter import FlopCounterMode

    from verl_diffusion_rollout.pipelines import get_family

    family = get_family(batch.family)
    with torch.device("meta"):
        model = type(transformer).from_config(transformer.config).to(transformer.dtype)
    model.requires_grad_(False)
    sampling = batch.sampling
    env = {k: None if v is None else v[:1] for k, v in batch.env().items()}
    shape = (1, *batch.all_latents.shape[2:])
    cond = _to_meta(family.condition(env, guidance_scale=1.0, batch_cfg=False, dtype=transformer.dtype,
                                     height=sampling.height, width=sampling.width, latent_shape=shape))
    x = torch.zeros(shape, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        out = family.velocity(model, x, torch.full((1,), 500.0, device="meta"), cond)
    with FlopCounterMode(display=False) as bwd:
        out.float().sum().backward()
    return {"forward": float(fwd.get_total_flops()), "backward": float(bwd.get_total_flops())}


def phase_flops(trainer, flops: dict[str, float], config, recomputed_blocks: int | None = None) -> dict[str, float]:
    """FLOPs of the last step's rollout (every sample, every step, every CFG pass) and update (every trained
    sample-step: forward + backward, + the recomputed share of the forward under gradient checkpointing;
    ``recomputed_blocks``: the step's count under ``checkpoint_blocks=auto``, the most any forward recomputed)."""
    actor = trainer.workers.actor
    sampling = config.rollout.sampling
    passes = 2 if sampling.guidance_scale > 1 else 1
    samples = sum(len(b) for b in actor._batches)
    steps = actor._batches[0].num_steps
    trained = float(sum(b.sde_mask.sum() for b in actor._batches))
    recomputed = 0.0  # the share of the forward recomputed in the backward (the checkpointed blocks')
    if config.actor.gradient_checkpointing:
        blocks = len(actor.transformer.transformer_blocks)
        count = {None: blocks, "auto": recomputed_blocks}.get(config.actor.checkpoint_blocks,
                                                             config.actor.checkpoint_blocks)
        recomputed = (blocks if count is None else count) / blocks
    per_train = flops["forward"] * (1 + recomputed) + flops["backward"]
    return {"rollout": samples * steps * passes * flops["forward"], "train": trained * passes * per_train,
            "trained_sample_steps": trained}


# -- one trainer, several batch sizes --------------------------------------------------------------------------------


def compose_config(args, model_path: str, samples: int, variant: list[str], out_dir: Path):
    """The recipe's config with the benchmark's model, prompts, reward and batch size (validated as a user's is)."""
    from hydra import compose, initialize_config_dir

    from verl_diffusion_rollout.trainer.config import FlowGRPOConfig

    recipe = RECIPES[(args.family, args.tiny)]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        base = compose(config_name=recipe)
    mini = base.actor_rollout_ref.actor.mini_batch_size
    if args.prompts_file:  # one prompt per line, read by the recipe itself
        prompt_source = ["data.prompts=null", f"data.train_files={Path(args.prompts_file).resolve()}"]
    else:
        prompts = [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(args.prompt_words)) for i in range(64)]
        prompt_source = ["data.train_files=null", f"data.prompts=[{','.join(prompts)}]"]
    overrides = [
        f"actor_rollout_ref.model.path={model_path}",
        *prompt_source,
        f"data.samples_per_step={samples}",
        f"actor_rollout_ref.actor.mini_batch_size={min(mini, samples) if mini else 'null'}",
        *reward_overrides(args),
        *PRESETS[args.preset],
        # verl-omni's mini-batch: half the step's prompts (ppo_mini_batch_size=16 of train_batch_size=32)
        *([f"actor_rollout_ref.actor.mini_batch_size={samples // 2 if samples % 32 == 0 else samples}"]
          if args.preset == "verl_omni" else []),
        f"trainer.output_dir={out_dir}",
        # one compile cache for every variant and every run: a later run's first step compiles from it
        f"trainer.compile_cache_dir={Path(args.compile_cache_dir or Path(args.work_dir) / 'compile_cache').resolve()}",
        "trainer.total_steps=1000",
        "trainer.save_freq=0",  # --resume saves after each step itself, outside the timed step
        *(["trainer.max_actor_ckpt_to_keep=1"] if args.resume else []),
        *([f"trainer.resume_from={out_dir / 'checkpoints'}"]
          if args.resume and (out_dir / "checkpoints" / "latest").is_file() else []),
        "trainer.plot_freq=0",
        "trainer.logger=[file]",
        "data.val_prompts=null",
        "trainer.progress_bar=false",
        *args.override,
        *variant,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name=recipe, overrides=overrides)
    return FlowGRPOConfig.from_omegaconf(cfg)


def host_rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_variant(args, name: str, samples_list: list[int], model_path: str, info: dict, rows: list[dict],
                report=lambda: None, extras: dict | None = None) -> None:
    """Load the recipe once, then run ``--steps`` steps at each batch size; append one row per step (and call
    ``report`` after each, so a run cut short still leaves its results). ``extras`` collects the FLOP counts and
    the profile."""
    from verl_diffusion_rollout.compile_cache import compile_cache_stats
    from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer

    import torch._functorch.config as functorch_config

    extras = {} if extras is None else extras
    overrides = variant_overrides(name)
    out_dir = Path(args.work_dir) / name
    configs = {s: compose_config(args, model_path, s, overrides, out_dir) for s in samples_list}
    cuda = torch.cuda.is_available() and configs[samples_list[0]].rollout.device != "cpu"
    # Each variant compiles as a fresh process would (from the on-disk cache, not this process's earlier graphs), and
    # a variant's process-wide partitioner budget (amb<P>) does not outlive it.
    torch._dynamo.reset()
    budget = functorch_config.activation_memory_budget
    start = time.perf_counter()
    trainer = FlowGRPOTrainer(configs[samples_list[0]])
    load_s = time.perf_counter() - start
    pad = None
    if cuda and args.pad_text_encoder and info.get("text_layer_bytes"):
        missing = info["text_layers_full"] - info["text_layers"]
        pad = torch.empty(missing * info["text_layer_bytes"], dtype=torch.uint8, device="cuda")
    flops = None
    try:
        for samples in samples_list:
            config = configs[samples]
            # Only the driver reads the batch size and the mini-batch: the loaded workers are reused as they are.
            assert config.actor.micro_batch_size == trainer.config.actor.micro_batch_size
            trainer.config = config
            for k in range(args.steps):
                if not args.budget.allows(rows, samples):
                    return
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                row = {"variant": name, "samples": samples, "step_in_phase": k + 1, "load_s": load_s,
                       "micro_batch_size": config.actor.micro_batch_size,
                       "gradient_checkpointing": config.actor.gradient_checkpointing,
                       "checkpoint_blocks": config.actor.checkpoint_blocks,
                       "batch_cfg": config.rollout.sampling.batch_cfg}
                cache_before = compile_cache_stats()
                try:
                    m = trainer.train_step()
                except torch.OutOfMemoryError as err:
                    rows.append({**row, "error": f"out of memory: {str(err).splitlines()[0][:120]}"})
                    print(json.dumps(rows[-1]), flush=True)
                    report()
                    return
                row["rl_step"] = trainer.step  # the run's step: it goes on across commands with --resume
                if args.resume:
                    t0 = time.perf_counter()
                    trainer.save()
                    row["save_s"] = time.perf_counter() - t0
                row.update({key: m.get(key) for key in ("rollout_s", "reward_s", "train_s", "switch_s",
                                                        "allreduce_s", "step_s", "images_per_s_per_worker",
                                                        "logprob_max_abs_diff_pre_update", "weight_version",
                                                        "trained_samples")})
                row["switch_frac"] = m["switch_s"] / m["step_s"]
                row["host_rss_gib"] = host_rss_gib()
                after = compile_cache_stats()
                row["compile_cache"] = {key: after[key] - cache_before[key] for key in after}
                if cuda:
                    row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    row["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                if flops is None:
                    flops = transformer_flops(trainer.workers.actor.transformer, trainer.workers.actor._batches[0])
                    extras.setdefault("flops_per_pass", {})[name] = flops
                row["recomputed_blocks"] = m.get("recomputed_blocks")  # checkpoint_blocks=auto's choice
                work = phase_flops(trainer, flops, config, row["recomputed_blocks"])
                row["rollout_tflop"] = work["rollout"] / 1e12
                row["train_tflop"] = work["train"] / 1e12
                row["trained_sample_steps"] = work["trained_sample_steps"]
                # the rollout phase includes the reward (scored in the background; the wait is reward_s)
                row["rollout_matrix_frac"] = work["rollout"] / max(m["rollout_s"] - m["reward_s"], 1e-9) / (
                    args.peak_tflops * 1e12)
                row["train_matrix_frac"] = work["train"] / m["train_s"] / (args.peak_tflops * 1e12)
                rows.append(row)
                print(json.dumps(row), flush=True)
                report()
        if args.profile:
            extras.setdefault("profiles", {})[name] = profile_rollout(args, trainer, name)
            report()
    finally:
        del pad
        trainer.close()
        del trainer
        gc.collect()
        functorch_config.activation_memory_budget = budget
        if cuda:
            torch.cuda.empty_cache()


def profile_rollout(args, trainer, name: str) -> dict[str, Any]:
    """One more training step with the in-trainer rollout (the actor's ``generate``) under ``torch.profiler``:
    the top ops by device time (CPU time on the CPU) go to ``<out>/<stem>_profile_<variant>.txt``; returns the
    summary (device-busy fraction of the rollout's wall time: below 1 where the host stalls the device)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    actor = trainer.workers.actor
    original = actor.generate
    cuda = actor.device.type == "cuda"
    captured: dict[str, Any] = {}

    def profiled(*a, **kw):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            result = original(*a, **kw)
            if cuda:
                torch.cuda.synchronize()
            captured["wall_s"] = time.perf_counter() - start
        captured["prof"] = prof
        return result

    actor.generate = profiled
    try:
        trainer.train_step()
    finally:
        del actor.generate  # back to the class's method
    prof = captured["prof"]
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=sort, row_limit=args.profile_rows)
    path = Path(args.out) / f"{args.stem}_profile_{name}.txt"
    path.write_text(f"in-trainer rollout of variant {name}, {captured['wall_s']:.2f} s wall\n\n{table}\n")
    # device time is the kernels' own (events on the device, as torch's "Self CUDA time total" sums them): the ops
    # that launch them report the same time again and would count it twice
    kernels = [(e.key, e.self_device_time_total) for e in averages
               if e.device_type == DeviceType.CUDA and not e.is_user_annotation] if cuda else []
    device_us = sum(us for _, us in kernels)
    top = sorted(averages, key=lambda e: getattr(e, sort), reverse=True)[:10]
    return {
        "file": path.name,
        "wall_s": captured["wall_s"],
        "device_busy_frac": device_us / 1e6 / captured["wall_s"] if cuda else None,
        "kernel_breakdown": kernel_breakdown.breakdown(kernels) if cuda else None,
        "top": [{"op": e.key, "self_ms": getattr(e, sort) / 1e3, "calls": e.count} for e in top],
    }


@dataclasses.dataclass
class StepBudget:
    """``--budget-s``: start no step that would end more than ``seconds`` after the command's start, estimated from
    the last measured step (scaled by the sample counts), so a command under a time limit ends between steps with
    complete results instead of being killed in one. ``stopped`` says why the run stopped (None: it did not)."""

    seconds: float | None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    stopped: str | None = None

    def allows(self, rows: list[dict], samples: int) -> bool:
        """Whether a step of ``samples`` samples still fits, given the rows measured so far."""
        if self.stopped is not None:
            return False
        last = next((r for r in reversed(rows) if "step_s" in r), None)
        if self.seconds is None or last is None:
            return True
        estimate = last["step_s"] * samples / last["samples"]
        elapsed = time.perf_counter() - self.started
        if elapsed + estimate <= self.seconds:
            return True
        self.stopped = (f"stopped by --budget-s {self.seconds:g}: {elapsed:.0f} s elapsed, the next step "
                        f"({samples} samples) would take about {estimate:.0f} s")
        print(self.stopped, flush=True)
        return False


def _step_label(row: dict) -> str:
    """The step in this command's phase, and the run's RL step where they differ (a resumed run, several batch
    sizes)."""
    k, rl = row["step_in_phase"], row.get("rl_step", row["step_in_phase"])
    return str(k) if k == rl else f"{k} (RL step {rl})"


def summarize(rows: list[dict], warmup: int = 2) -> list[dict]:
    """Per (variant, samples): the first step, and the steady state as the mean of the steps after the first
    ``warmup`` (None when there are none), with how many steps were averaged."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["samples"]), []).append(r)
    out = []
    for (variant, samples), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        steady = ok[warmup:]
        mean = (lambda key: float(sum(r[key] for r in steady) / len(steady)) if steady else None)
        first = ok[0] if ok else {}
        entry = {
            "variant": variant, "samples": samples, "steps": len(ok), "steady_steps_averaged": len(steady),
            "first_step_s": first.get("step_s"),
            "first_images_per_s": first.get("images_per_s_per_worker"),
            "logprob_gap_max": max((r["logprob_max_abs_diff_pre_update"] for r in ok
                                    if r.get("logprob_max_abs_diff_pre_update") is not None), default=None),
            "peak_gpu_gib_max": max((r["peak_gpu_gib"] for r in ok if r.get("peak_gpu_gib") is not None),
                                    default=None),
            "error": next((r["error"] for r in rs if "error" in r), None),
        }
        for key in ("step_s", "rollout_s", "reward_s", "train_s", "switch_s", "images_per_s_per_worker",
                    "rollout_matrix_frac", "train_matrix_frac"):
            entry[f"steady_{key}"] = mean(key)
        if entry["steady_step_s"] and entry["first_step_s"]:
            entry["first_over_steady"] = entry["first_step_s"] / entry["steady_step_s"]
        out.append(entry)
    return out


# -- report ---------------------------------------------------------------------------------------------------------


def _f(value: Any, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def markdown(results: dict) -> str:
    meta = results["meta"]
    reward = meta.get("reward", "JPEG compressibility")
    lines = [
        f"# Whole-step FlowGRPO benchmark: {meta['device']} ({meta['date']})",
        "",
        f"Recipe `{meta['recipe']}` ({meta['family']}, preset {meta.get('preset', 'none')}), {meta['resolution']}px, "
        f"{meta['num_steps']} sampling steps, CFG {meta['guidance_scale']}, SDE window "
        f"{meta['sde_window_size'] or 'all steps'}, LoRA r={meta['lora_rank']} on {meta['lora_targets']} projections, "
        f"group {meta['group_size']}, reward {reward}. Prompts: {meta.get('prompts', 'built-in')}. "
        f"Model: {meta['model']}. torch {meta['torch']}, diffusers {meta['diffusers']}, peft {meta['peft']}, "
        f"transformers {meta.get('transformers', '?')}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        *([f"**{meta['stopped']}**", ""] if meta.get("stopped") else []),
        f"## Steady state (mean of the steps after the first {meta.get('warmup_steps', 2)})",
        "",
        "| variant | samples/step | steps averaged | first step s | steady step s | first / steady | steady img/s/GPU | "
        "rollout s | reward wait s | train s | rollout of matrix rate | train of matrix rate | peak GPU GiB | "
        "max log-prob gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results.get("summary", []):
        lines.append(
            f"| {e['variant']} | {e['samples']} | {e['steady_steps_averaged']} of {e['steps']} | "
            f"{_f(e['first_step_s'])} | {_f(e['steady_step_s'])} | {_f(e.get('first_over_steady'))} | "
            f"{_f(e['steady_images_per_s_per_worker'], '.3f')} | {_f(e['steady_rollout_s'])} | "
            f"{_f(e['steady_reward_s'])} | {_f(e['steady_train_s'])} | {_f(e['steady_rollout_matrix_frac'], '.0%')} | "
            f"{_f(e['steady_train_matrix_frac'], '.0%')} | {_f(e['peak_gpu_gib_max'], '.1f')} | "
            f"{_f(e['logprob_gap_max'], '.2g')} |" + (f" {e['error']}" if e.get("error") else "")
        )
    lines += [
        "",
        "## Every step",
        "",
        "| variant | samples/step | step | rollout s | reward s | train s | switch s (%) | step s | img/s/GPU | "
        "rollout / train of matrix rate | peak GPU GiB | host RSS GiB | log-prob gap | compile cache hit/miss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['samples']} | {r['step_in_phase']} | {r['error']} |" + " |" * 10)
            continue
        cache = r.get("compile_cache") or {}
        hits = cache.get("fxgraph_cache_hit", 0) + cache.get("autograd_cache_hit", 0)
        misses = cache.get("fxgraph_cache_miss", 0) + cache.get("autograd_cache_miss", 0)
        lines.append(
            f"| {r['variant']} | {r['samples']} | {_step_label(r)} | {r['rollout_s']:.2f} | {r['reward_s']:.2f} | "
            f"{r['train_s']:.2f} | {r['switch_s']:.3f} ({100 * r['switch_frac']:.2f}%) | {r['step_s']:.2f} | "
            f"{r['images_per_s_per_worker']:.3f} | {_f(r.get('rollout_matrix_frac'), '.0%')} / "
            f"{_f(r.get('train_matrix_frac'), '.0%')} | {_f(r.get('peak_gpu_gib'), '.1f')} | {r['host_rss_gib']:.1f} | "
            f"{_f(r['logprob_max_abs_diff_pre_update'], '.2g')} | {hits}/{misses} |"
        )
    flops = results.get("flops_per_pass", {})
    lines += [
        "",
        f"Matrix rate: {meta.get('peak_tflops', MATRIX_TFLOPS)} TFLOP/s bf16. FLOPs per sample and CFG pass "
        "(FlopCounterMode on a meta copy of the transformer): "
        + ", ".join(f"{v}: forward {f['forward'] / 1e12:.4g} TFLOP, backward {f['backward'] / 1e12:.4g}"
                    for v, f in flops.items())
        + ". Rollout: every sample, step and CFG pass, over the rollout time less the reward wait (text encoding "
        "and VAE decoding are in the time, not in the FLOPs). Train: every replayed sample-step and CFG pass, "
        "forward + backward to the inputs (+ the recomputed forward under gradient checkpointing).",
        "",
        f"verl-omni's published whole-step figure: {VERL_OMNI_IMG_PER_GPU_S} images/s per GPU (Qwen-Image LoRA, "
        "4 x H800, 32 prompts x 16 per step, its docs/algo/performance.md).",
    ]
    if meta.get("gpu_memory_cap_gib"):
        lines.append(f"PyTorch's allocator was capped at {meta['gpu_memory_cap_gib']:g} GiB "
                     "(`set_per_process_memory_fraction`), as on a GPU of that size.")
    if any(r.get("recomputed_blocks") is not None for r in results["rows"]):
        lines.append("Blocks recomputed by `checkpoint_blocks=auto`, by step (the most of any update forward): "
                     + ", ".join(f"{r['variant']} step {_step_label(r)}: {r['recomputed_blocks']}"
                                 for r in results["rows"] if r.get("recomputed_blocks") is not None) + ".")
    if meta.get("padded_text_encoder_gib"):
        lines.append(f"Peak GPU memory includes {meta['padded_text_encoder_gib']:.1f} GiB allocated for the text "
                     "encoder's missing layers (the full text encoder's memory).")
    for variant, p in results.get("profiles", {}).items():
        busy = p.get("device_busy_frac")
        lines += ["", f"Profile of the in-trainer rollout ({variant}): {p['wall_s']:.2f} s wall"
                  + (f", device busy {busy:.0%} of it" if busy is not None else "") + f"; table in `{p['file']}`.",
                  "", "| op | self ms | calls |", "|---|---|---|"]
        lines += [f"| `{t['op'][:60]}` | {t['self_ms']:.1f} | {t['calls']} |" for t in p["top"]]
        if p.get("kernel_breakdown"):
            lines += ["", f"Device time by kernel kind ({variant}):", "",
                      kernel_breakdown.markdown(p["kernel_breakdown"]).rstrip("\n")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (as CI runs it)")
    parser.add_argument("--family", choices=["qwenimage", "sd3"], default="qwenimage")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="none",
                        help="verl_omni: verl-omni's Qwen-Image job (r64 on its projections, 16 per prompt, "
                             "colocated 8B VLM reward)")
    parser.add_argument("--samples", type=int, nargs="+", default=None,
                        help="samples per step (default 16 64 128; the preset: --prompts-per-step x 16)")
    parser.add_argument("--prompts-per-step", type=int, default=16, help="with --preset verl_omni")
    parser.add_argument("--steps", type=int, default=2, help="steps per batch size (the first includes warm-up)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the steady-state mean")
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated, each {sorted(VARIANTS)}, ckpt<N> or amb<P>, joined with + "
                             "(micro8+ckpt40)")
    parser.add_argument("--variant-samples", type=int, nargs="+", default=None,
                        help="batch sizes of the non-default variants (default: the smallest of --samples)")
    parser.add_argument("--prompts-file", "--prompt-file", dest="prompts_file", default=None,
                        help="a text file, one prompt per line (data.train_files), e.g. "
                             "benchmarks/prompts/mixed_lengths.txt")
    parser.add_argument("--reward-model", choices=["none", "qwen3_vl_8b"], default=None,
                        help="a colocated VLM reward built with random bf16 weights (default: qwen3_vl_8b with "
                             "--preset verl_omni, else none: JPEG compressibility)")
    parser.add_argument("--reward-model-path", default=None, help="an existing VLM folder for the vlm_ocr reward")
    parser.add_argument("--reward-batch", type=int, default=16, help="images per VLM reward forward")
    parser.add_argument("--profile", action="store_true",
                        help="one more step per variant with the in-trainer rollout under torch.profiler")
    parser.add_argument("--profile-rows", type=int, default=40)
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="cap PyTorch's allocator at this many GiB (set_per_process_memory_fraction), to run as a "
                             "GPU of that size would, e.g. 79.2 for an 80 GB H100")
    parser.add_argument("--peak-tflops", type=float, default=MATRIX_TFLOPS, help="the matrix rate fractions refer to")
    parser.add_argument("--text-layers", type=int, default=4, help="text-encoder layers built at real size")
    parser.add_argument("--dit-layers", type=int, default=None, help="DiT layers (default: the published count)")
    parser.add_argument("--pad-text-encoder", action=argparse.BooleanOptionalAction, default=True,
                        help="allocate the missing text-encoder layers' memory on the GPU")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every variant")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no step that would end (estimated from the last one) more than this many seconds "
                             "after the command's start: under a time limit the run stops between steps, results "
                             "complete (with --resume the next command goes on from there)")
    parser.add_argument("--resume", action="store_true",
                        help="go on from each variant's last checkpoint under --work-dir and write one after every "
                             "step (untimed): a run longer than one command continues in the next")
    parser.add_argument("--model-path", default=None, help="an existing model folder instead of building one")
    parser.add_argument("--prompt-words", type=int, default=12, help="words of each generated prompt")
    parser.add_argument("--model-dir", default="/tmp/step_bench_model")
    parser.add_argument("--work-dir", default="/tmp/step_bench_runs")
    parser.add_argument("--compile-cache-dir", default=None,
                        help="trainer.compile_cache_dir of every variant (default <work-dir>/compile_cache; a second "
                             "run's first step then compiles from the cache)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default="", help="appended to the result file names")
    args = parser.parse_args()
    args.budget = StepBudget(args.budget_s)
    if args.dit_layers is None:
        args.dit_layers = 60 if args.family == "qwenimage" else 24
    if args.preset == "verl_omni" and args.family != "qwenimage":
        parser.error("--preset verl_omni is verl-omni's Qwen-Image job; use --family qwenimage")
    if args.samples is None:
        if args.preset == "verl_omni":
            args.samples = [args.prompts_per_step * 16]
        else:
            args.samples = [16, 32] if args.tiny else [16, 64, 128]
    if args.prompts_file and not Path(args.prompts_file).is_file():
        parser.error(f"--prompts-file {args.prompts_file!r} does not exist")
    if not args.tiny and not args.model_path and not torch.cuda.is_available():
        parser.error("the real-size benchmark needs a CUDA GPU; use --tiny on the CPU")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        try:
            variant_overrides(v)
        except KeyError as err:
            parser.error(str(err.args[0]))
    if args.reward_model is None:
        args.reward_model = "qwen3_vl_8b" if args.preset == "verl_omni" and not args.reward_model_path else "none"
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.gpu_memory_gib is not None:
        if not torch.cuda.is_available() or args.tiny:
            parser.error("--gpu-memory-gib caps a CUDA device's allocator; this run has none")
        total = torch.cuda.get_device_properties(0).total_memory
        if not 0 < args.gpu_memory_gib * 2**30 <= total:
            parser.error(f"--gpu-memory-gib {args.gpu_memory_gib} is not in (0, {total / 2**30:.1f}]")
        torch.cuda.set_per_process_memory_fraction(args.gpu_memory_gib * 2**30 / total)

    import diffusers
    import peft
    import transformers

    model_path, info = model_folder(args)
    info.setdefault("text_layers", args.text_layers)
    reward_info = None
    if args.reward_model != "none" and not args.reward_model_path:
        args.reward_model_path, reward_info = reward_model_folder(args)
    probe = compose_config(args, model_path, args.samples[0], [], Path(args.work_dir) / "probe")
    sampling = probe.rollout.sampling
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else platform.processor() or "cpu"
    pad_gib = 0.0
    if not args.tiny and args.pad_text_encoder and info.get("text_layer_bytes"):
        pad_gib = (info["text_layers_full"] - info["text_layers"]) * info["text_layer_bytes"] / 2**30
    reward = "JPEG compressibility (free)"
    if args.reward_model_path:
        reward = (f"vlm_ocr: a colocated {reward_info['description'] if reward_info else args.reward_model_path} "
                  f"scoring every image (batches of {args.reward_batch}), its time included")
    results: dict[str, Any] = {
        "meta": {
            "device": device,
            "device_tag": ("cpu" if args.tiny else device.replace("NVIDIA ", "").split()[0]),
            "date": datetime.date.today().isoformat(),
            "family": args.family,
            "recipe": RECIPES[(args.family, args.tiny)],
            "preset": args.preset,
            "model": "tiny test model" if args.tiny else
            f"random bf16 weights, DiT {info.get('dit_params_b', 0):.1f}B ({args.dit_layers} layers), "
            f"{info.get('text_encoder')}",
            "reward": reward,
            "reward_model_info": reward_info,
            "prompts": args.prompts_file or f"built-in, {args.prompt_words} words each",
            "resolution": sampling.height,
            "num_steps": sampling.num_steps,
            "guidance_scale": sampling.guidance_scale,
            "sde_window_size": sampling.sde_window_size,
            "lora_rank": probe.model.lora_rank,
            "lora_targets": len(probe.model.target_modules),
            "lora_target_modules": list(probe.model.target_modules),
            "group_size": probe.rollout.n,
            "micro_batch_size": probe.actor.micro_batch_size,
            "gradient_checkpointing": probe.actor.gradient_checkpointing,
            "compile": probe.rollout.compile,
            "compile_cache_dir": probe.trainer.resolved_compile_cache_dir,
            "warmup_steps": args.warmup_steps,
            "peak_tflops": args.peak_tflops,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
            "padded_text_encoder_gib": pad_gib,
            "gpu_memory_cap_gib": args.gpu_memory_gib,
            "model_info": info,
            "command": "python benchmarks/step_bench.py " + " ".join(sys.argv[1:]),
        },
        "rows": [],
        "summary": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = "" if args.preset == "none" else f"_{args.preset}"
    args.stem = stem = f"{results['meta']['device_tag']}_{results['meta']['date']}_step_{args.family}{preset}{args.tag}"

    def report() -> None:
        results["summary"] = summarize(results["rows"], args.warmup_steps)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
        (out / f"{stem}.md").write_text(markdown(results))

    for name in variants:
        samples = args.samples if name == "default" else (args.variant_samples or [min(args.samples)])
        if not args.budget.allows(results["rows"], min(samples)):
            break
        run_variant(args, name, samples, model_path, info, results["rows"], report, extras=results)
    results["meta"]["stopped"] = args.budget.stopped
    report()
    print(markdown(results))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
