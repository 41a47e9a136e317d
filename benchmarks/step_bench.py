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

The reward is JPEG compressibility (no reward model is downloaded); PickScore's cost is not included. Phases of
``--samples`` samples per step (groups of the recipe's ``rollout.n``) run ``--steps`` steps each on one loaded
model; the first step of the first phase includes ``torch.compile`` warm-up. ``--variants`` repeats the run with
other settings (merged vs unmerged LoRA forward, micro-batch, gradient checkpointing...), each on a fresh trainer.

Reported per step: rollout / reward / train / mode-switch seconds (the trainer's ``switch_s``: the merged weights
re-derived after each optimizer step; there is no separate LoRA sync, the rollout samples with the trained module
itself), images/s per GPU for the whole step, peak GPU memory, host RSS, and the pre-update log-prob gap.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import verl_diffusion_rollout  # noqa: E402,F401  (registers the rollout and the config resolvers)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
RECIPES = {("qwenimage", False): "flowgrpo_qwenimage", ("qwenimage", True): "flowgrpo_tiny",
           ("sd3", False): "flowgrpo_sd35m", ("sd3", True): "flowgrpo_sd3_tiny"}
# Named setting changes, each a list of Hydra overrides on top of the recipe.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "unmerged": ["actor_rollout_ref.rollout.lora.merge=false"],
    "micro2": ["actor_rollout_ref.actor.micro_batch_size=2"],
    "micro8": ["actor_rollout_ref.actor.micro_batch_size=8"],
    "no_ckpt": ["actor_rollout_ref.actor.gradient_checkpointing=false"],
    "eager": ["actor_rollout_ref.rollout.compile=false"],
    "recompute": ["actor_rollout_ref.actor.recompute_old_log_probs=true"],
}
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


# -- one trainer, several batch sizes --------------------------------------------------------------------------------


def compose_config(args, model_path: str, samples: int, variant: list[str], out_dir: Path):
    """The recipe's config with the benchmark's model, prompts, reward and batch size (validated as a user's is)."""
    from hydra import compose, initialize_config_dir

    from verl_diffusion_rollout.trainer.config import FlowGRPOConfig

    recipe = RECIPES[(args.family, args.tiny)]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        base = compose(config_name=recipe)
    mini = base.actor_rollout_ref.actor.mini_batch_size
    prompts = [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(args.prompt_words)) for i in range(64)]
    overrides = [
        f"actor_rollout_ref.model.path={model_path}",
        "data.train_files=null",
        f"data.prompts=[{','.join(prompts)}]",
        f"data.samples_per_step={samples}",
        f"actor_rollout_ref.actor.mini_batch_size={min(mini, samples) if mini else 'null'}",
        "~reward.functions",
        "+reward.functions={jpeg_compressibility: 1.0}",
        "~reward.options",
        "+reward.options={}",
        f"trainer.output_dir={out_dir}",
        "trainer.total_steps=1000",
        "trainer.save_freq=0",
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
                report=lambda: None) -> None:
    """Load the recipe once, then run ``--steps`` steps at each batch size; append one row per step (and call
    ``report`` after each, so a run cut short still leaves its results)."""
    from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer

    overrides = VARIANTS[name]
    out_dir = Path(args.work_dir) / name
    configs = {s: compose_config(args, model_path, s, overrides, out_dir) for s in samples_list}
    cuda = torch.cuda.is_available() and configs[samples_list[0]].rollout.device != "cpu"
    start = time.perf_counter()
    trainer = FlowGRPOTrainer(configs[samples_list[0]])
    load_s = time.perf_counter() - start
    pad = None
    if cuda and args.pad_text_encoder and info.get("text_layer_bytes"):
        missing = info["text_layers_full"] - info["text_layers"]
        pad = torch.empty(missing * info["text_layer_bytes"], dtype=torch.uint8, device="cuda")
    try:
        for samples in samples_list:
            config = configs[samples]
            # Only the driver reads the batch size and the mini-batch: the loaded workers are reused as they are.
            assert config.actor.micro_batch_size == trainer.config.actor.micro_batch_size
            trainer.config = config
            for k in range(args.steps):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                row = {"variant": name, "samples": samples, "step_in_phase": k + 1, "load_s": load_s}
                try:
                    m = trainer.train_step()
                except torch.OutOfMemoryError as err:
                    rows.append({**row, "error": f"out of memory: {str(err).splitlines()[0][:120]}"})
                    print(json.dumps(rows[-1]), flush=True)
                    report()
                    return
                row.update({key: m.get(key) for key in ("rollout_s", "reward_s", "train_s", "switch_s",
                                                        "allreduce_s", "step_s", "images_per_s_per_worker",
                                                        "logprob_max_abs_diff_pre_update", "weight_version")})
                row["switch_frac"] = m["switch_s"] / m["step_s"]
                row["host_rss_gib"] = host_rss_gib()
                if cuda:
                    row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    row["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
                rows.append(row)
                print(json.dumps(row), flush=True)
                report()
    finally:
        del pad
        trainer.close()
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# -- report ---------------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"# Whole-step FlowGRPO benchmark: {meta['device']} ({meta['date']})",
        "",
        f"Recipe `{meta['recipe']}` ({meta['family']}), {meta['resolution']}px, {meta['num_steps']} sampling steps, "
        f"CFG {meta['guidance_scale']}, SDE window {meta['sde_window_size'] or 'all steps'}, LoRA r={meta['lora_rank']} "
        f"on {meta['lora_targets']} projections, group {meta['group_size']}, reward JPEG compressibility. "
        f"Model: {meta['model']}. torch {meta['torch']}, diffusers {meta['diffusers']}, peft {meta['peft']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| variant | samples/step | step | rollout s | reward s | train s | switch s (%) | step s | img/s/GPU | "
        "peak GPU GiB | host RSS GiB | log-prob gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['samples']} | {r['step_in_phase']} | {r['error']} |" + " |" * 8)
            continue
        peak = f"{r['peak_gpu_gib']:.1f}" if r.get("peak_gpu_gib") is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['samples']} | {r['step_in_phase']} | {r['rollout_s']:.2f} | {r['reward_s']:.2f} | "
            f"{r['train_s']:.2f} | {r['switch_s']:.3f} ({100 * r['switch_frac']:.2f}%) | {r['step_s']:.2f} | "
            f"{r['images_per_s_per_worker']:.3f} | {peak} | {r['host_rss_gib']:.1f} | "
            f"{r['logprob_max_abs_diff_pre_update']:.2g} |"
        )
    lines += [
        "",
        f"verl-omni's published whole-step figure: {VERL_OMNI_IMG_PER_GPU_S} images/s per GPU (Qwen-Image LoRA, "
        "4 x H800, 32 prompts x 16 per step, its docs/algo/performance.md).",
    ]
    if meta.get("padded_text_encoder_gib"):
        lines.append(f"Peak GPU memory includes {meta['padded_text_encoder_gib']:.1f} GiB allocated for the text "
                     "encoder's missing layers (the full text encoder's memory).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (as CI runs it)")
    parser.add_argument("--family", choices=["qwenimage", "sd3"], default="qwenimage")
    parser.add_argument("--samples", type=int, nargs="+", default=None, help="samples per step (default 16 64 128)")
    parser.add_argument("--steps", type=int, default=2, help="steps per batch size (the first includes warm-up)")
    parser.add_argument("--variants", default="default", help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--variant-samples", type=int, nargs="+", default=None,
                        help="batch sizes of the non-default variants (default: the smallest of --samples)")
    parser.add_argument("--text-layers", type=int, default=4, help="text-encoder layers built at real size")
    parser.add_argument("--dit-layers", type=int, default=None, help="DiT layers (default: the published count)")
    parser.add_argument("--pad-text-encoder", action=argparse.BooleanOptionalAction, default=True,
                        help="allocate the missing text-encoder layers' memory on the GPU")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every variant")
    parser.add_argument("--model-path", default=None, help="an existing model folder instead of building one")
    parser.add_argument("--prompt-words", type=int, default=12)
    parser.add_argument("--model-dir", default="/tmp/step_bench_model")
    parser.add_argument("--work-dir", default="/tmp/step_bench_runs")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default="", help="appended to the result file names")
    args = parser.parse_args()
    if args.dit_layers is None:
        args.dit_layers = 60 if args.family == "qwenimage" else 24
    if args.samples is None:
        args.samples = [16, 32] if args.tiny else [16, 64, 128]
    if not args.tiny and not args.model_path and not torch.cuda.is_available():
        parser.error("the real-size benchmark needs a CUDA GPU; use --tiny on the CPU")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    torch.backends.cuda.matmul.allow_tf32 = True

    import diffusers
    import peft

    model_path, info = model_folder(args)
    info.setdefault("text_layers", args.text_layers)
    probe = compose_config(args, model_path, args.samples[0], [], Path(args.work_dir) / "probe")
    sampling = probe.rollout.sampling
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else platform.processor() or "cpu"
    pad_gib = 0.0
    if not args.tiny and args.pad_text_encoder and info.get("text_layer_bytes"):
        pad_gib = (info["text_layers_full"] - info["text_layers"]) * info["text_layer_bytes"] / 2**30
    results: dict[str, Any] = {
        "meta": {
            "device": device,
            "device_tag": ("cpu" if args.tiny else device.replace("NVIDIA ", "").split()[0]),
            "date": datetime.date.today().isoformat(),
            "family": args.family,
            "recipe": RECIPES[(args.family, args.tiny)],
            "model": "tiny test model" if args.tiny else
            f"random bf16 weights, DiT {info.get('dit_params_b', 0):.1f}B ({args.dit_layers} layers), "
            f"{info.get('text_encoder')}",
            "resolution": sampling.height,
            "num_steps": sampling.num_steps,
            "guidance_scale": sampling.guidance_scale,
            "sde_window_size": sampling.sde_window_size,
            "lora_rank": probe.model.lora_rank,
            "lora_targets": len(probe.model.target_modules),
            "group_size": probe.rollout.n,
            "micro_batch_size": probe.actor.micro_batch_size,
            "compile": probe.rollout.compile,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "padded_text_encoder_gib": pad_gib,
            "model_info": info,
            "command": "python benchmarks/step_bench.py " + " ".join(sys.argv[1:]),
        },
        "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{results['meta']['device_tag']}_{results['meta']['date']}_step_{args.family}{args.tag}"

    def report() -> None:
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
        (out / f"{stem}.md").write_text(markdown(results))

    for name in variants:
        samples = args.samples if name == "default" else (args.variant_samples or [min(args.samples)])
        run_variant(args, name, samples, model_path, info, results["rows"], report)
    report()
    print(markdown(results))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
