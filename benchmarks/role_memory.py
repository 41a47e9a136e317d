"""Per-role memory: each role (encoder, denoiser, decoder, monolithic) loaded alone, in a fresh process.

    python benchmarks/role_memory.py                       # real-size Qwen-Image (random bf16) on one GPU
    python benchmarks/role_memory.py --family sd3          # real-size SD3.5-Medium
    python benchmarks/role_memory.py --model-path DIR      # an existing folder (e.g. the one step_bench.py wrote)
    python benchmarks/role_memory.py --tiny                # the tiny model on the CPU (what CI runs)

The model folder is the one ``benchmarks/step_bench.py`` writes (its builders, imported: the published DiT and VAE
configs with random bf16 weights, the text encoder at full width with ``--text-layers`` layers), reused when it is
already there. Each role runs in its own process (so one role's memory never counts toward another's): it loads
``DiffusersEngine(model, role=...)``, then serves one request of its stage (encoder: ``--batch`` prompts;
denoiser: ``--batch`` samples from random prompt embeddings of the model's shapes, ``--num-steps`` steps with CFG;
decoder: ``--batch`` final latents; monolithic: the whole rollout).

Reported per role: the modules loaded, their parameter bytes, the load time, GPU memory allocated after loading,
and the peak allocated / reserved while loading and serving the request (CPU: the process's peak RSS). With
``--pad-text-encoder`` (default) the roles that hold the text encoder also allocate the memory of its missing layers,
so their figures are the full text encoder's. Writes ``<device>_<date>_role_memory_<family>.{json,md}`` under
``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROLES = ("encoder", "denoiser", "decoder", "monolithic")
TEXT_ROLES = ("encoder", "monolithic")  # the roles that hold the text encoder


# -- one role, in its own process -----------------------------------------------------------------------------------


def _random_env(pipe: Any, sampling: Any, rows: int, text_tokens: int) -> dict[str, torch.Tensor | None]:
    """Prompt embeddings of the shapes the denoiser's transformer takes (its own specs), random values."""
    generator = torch.Generator().manual_seed(0)
    env: dict[str, torch.Tensor | None] = {}
    for key, spec in pipe.env_specs(sampling, rows).items():
        if spec is None:
            env[key] = None
            continue
        shape = [text_tokens if isinstance(d, str) else d for d in spec.shape]
        env[key] = (torch.ones(shape, dtype=spec.dtype) if spec.binary
                    else torch.randn(shape, generator=generator).to(spec.dtype))
    return env


def run_child(args) -> dict[str, Any]:
    """Load one role, serve one request of its stage, and measure."""
    from step_bench import WORDS

    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.engines import DiffusersEngine

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    pad = None
    if cuda and args.pad_bytes and args.child in TEXT_ROLES:
        pad = torch.empty(args.pad_bytes, dtype=torch.uint8, device=args.device)
    start = time.perf_counter()
    engine = DiffusersEngine(args.model_path, device=args.device, dtype=args.dtype, role=args.child)
    load_s = time.perf_counter() - start
    row: dict[str, Any] = {"role": args.child, "pid": os.getpid(), "modules": list(engine.modules), "load_s": load_s}
    row["param_bytes_by_module"] = {
        name: sum(p.numel() * p.element_size() for p in module.parameters())
        for name in engine.modules if isinstance(module := getattr(engine.pipe, name), torch.nn.Module)
    }
    row["param_bytes"] = sum(row["param_bytes_by_module"].values())
    row["padded_bytes"] = pad.numel() if pad is not None else 0
    if cuda:
        torch.cuda.synchronize()
        row["allocated_after_load_gib"] = torch.cuda.memory_allocated() / 2**30
        row["peak_allocated_load_gib"] = torch.cuda.max_memory_allocated() / 2**30
    sampling = DiffusionSamplingConfig(
        height=args.height, width=args.width, num_steps=args.num_steps, guidance_scale=args.guidance_scale,
        max_sequence_length=args.max_sequence_length, sde_window_size=min(2, args.num_steps),
    )
    prompts = [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(args.prompt_words)) for i in range(args.batch)]
    seeds = list(range(args.batch))
    start = time.perf_counter()
    if args.child == "encoder":
        engine.encode(prompts, sampling)
        request = f"encode {args.batch} prompts"
    elif args.child == "denoiser":
        text_tokens = args.text_tokens or (64 if engine.family == "qwenimage" else 77 + args.max_sequence_length)
        env = _random_env(engine.pipe, sampling, args.batch, text_tokens)
        engine.denoise(env, prompts, seeds=seeds, sampling=sampling)
        request = f"denoise {args.batch} samples ({text_tokens} text tokens), {args.num_steps} steps"
    elif args.child == "decoder":
        latents = torch.randn(_decoder_latent_shape(engine, sampling, args.batch), generator=torch.Generator().manual_seed(0))
        engine.decode(latents, sampling)
        request = f"decode {args.batch} latents"
    else:
        engine.generate(prompts, seeds=seeds, sampling=sampling)
        request = f"generate {args.batch} samples, {args.num_steps} steps"
    if cuda:
        torch.cuda.synchronize()
        row["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    row["request"] = request
    row["request_s"] = time.perf_counter() - start
    row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


def _decoder_latent_shape(engine: Any, sampling: Any, batch: int) -> tuple[int, ...]:
    """Final latents of the image size, as the family's decoder takes them."""
    pipe, factor = engine.pipe, engine.pipe.vae_scale_factor
    if engine.family == "qwenimage":
        tokens = (sampling.height // factor // 2) * (sampling.width // factor // 2)
        return (batch, tokens, pipe.vae.config.z_dim * 4)
    return (batch, pipe.vae.config.latent_channels, sampling.height // factor, sampling.width // factor)


# -- the parent: model folder, one process per role, report ------------------------------------------------------------


def model_folder(args) -> tuple[str, dict[str, Any]]:
    """step_bench.py's folder (built on first use, reused after), or ``--model-path``."""
    import step_bench

    bench_args = argparse.Namespace(model_path=args.model_path, tiny=args.tiny, family=args.family,
                                    model_dir=args.model_dir, text_layers=args.text_layers, dit_layers=args.dit_layers)
    path, info = step_bench.model_folder(bench_args)
    info_file = Path(path) / "step_bench_model.json"
    if args.model_path and info_file.is_file():
        info = json.loads(info_file.read_text())
    return path, info


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    gpu = meta["device"] != "cpu" and not meta["tiny"]
    lines = [
        f"# Per-role memory: {meta['device']} ({meta['date']})",
        "",
        f"{meta['family']}, {meta['model']}, {meta['dtype']}; each role loaded alone in a fresh process, then one "
        f"request of its stage at {meta['height']}x{meta['width']}, CFG {meta['guidance_scale']}. torch "
        f"{meta['torch']}, diffusers {meta['diffusers']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
    ]
    if gpu:
        lines += ["| role | modules | parameters GiB | load s | allocated after load GiB | peak allocated GiB | "
                  "peak reserved GiB | request |", "|---|---|---:|---:|---:|---:|---:|---|"]
    else:
        lines += ["| role | modules | parameters MiB | load s | peak RSS GiB | request |", "|---|---|---:|---:|---:|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['role']} | error: {r['error'][:200]} |")
            continue
        modules = ", ".join(r["modules"])
        if gpu:
            params = (r["param_bytes"] + r["padded_bytes"]) / 2**30
            lines.append(f"| {r['role']} | {modules} | {params:.2f} | {r['load_s']:.1f} | "
                         f"{r['allocated_after_load_gib']:.2f} | {r['peak_allocated_gib']:.2f} | "
                         f"{r['peak_reserved_gib']:.2f} | {r['request']} |")
        else:
            lines.append(f"| {r['role']} | {modules} | {r['param_bytes'] / 2**20:.2f} | {r['load_s']:.2f} | "
                         f"{r['peak_rss_gib']:.2f} | {r['request']} |")
    if meta.get("padded_text_encoder_gib"):
        lines += ["", f"The encoder and monolithic figures include {meta['padded_text_encoder_gib']:.2f} GiB allocated "
                  "for the text encoder's missing layers (parameters column included), so they are the full text "
                  "encoder's."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test model on the CPU (as CI runs it)")
    parser.add_argument("--family", choices=["qwenimage", "sd3"], default="qwenimage")
    parser.add_argument("--model-path", default=None, help="an existing model folder instead of building one")
    parser.add_argument("--model-dir", default="/tmp/step_bench_model", help="where step_bench.py's folders live")
    parser.add_argument("--text-layers", type=int, default=4, help="text-encoder layers built at real size")
    parser.add_argument("--dit-layers", type=int, default=None, help="DiT layers (default: the published count)")
    parser.add_argument("--pad-text-encoder", action=argparse.BooleanOptionalAction, default=True,
                        help="allocate the missing text-encoder layers' memory in the roles that hold it (GPU)")
    parser.add_argument("--roles", default=",".join(ROLES), help=f"comma-separated, of {list(ROLES)}")
    parser.add_argument("--batch", type=int, default=None, help="prompts / samples / latents per request "
                        "(default 16; 2 with --tiny)")
    parser.add_argument("--height", type=int, default=None, help="image size (default 512; 64 with --tiny)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-steps", type=int, default=2, help="denoising steps of the request")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--max-sequence-length", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=12)
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text tokens of the denoiser's random embeddings (default 64; SD3: 77 + max length)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default="", help="appended to the result file names")
    # internal: run one role in this process
    parser.add_argument("--child", choices=ROLES, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pad-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (2 if args.tiny else 16)
    args.height = args.height or (64 if args.tiny else 512)
    args.width = args.width or args.height
    if args.child:
        row = run_child(args)
        Path(args.child_out).write_text(json.dumps(row))
        return
    if args.dit_layers is None:
        args.dit_layers = 60 if args.family == "qwenimage" else 24
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        parser.error(f"unknown roles {unknown}; known: {list(ROLES)}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        parser.error("the real-size benchmark needs a CUDA GPU; use --tiny on the CPU")

    import diffusers

    model_path, info = model_folder(args)
    pad_bytes = 0
    if cuda and args.pad_text_encoder and info.get("text_layer_bytes") and info.get("text_layers"):
        pad_bytes = (info["text_layers_full"] - info["text_layers"]) * info["text_layer_bytes"]
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    results: dict[str, Any] = {
        "meta": {
            "device": device_name,
            "device_tag": "cpu" if not cuda else device_name.replace("NVIDIA ", "").split()[0],
            "host": platform.node(),
            "date": datetime.date.today().isoformat(),
            "family": args.family,
            "tiny": args.tiny,
            "model": "tiny test model" if args.tiny else
            f"random bf16 weights, DiT {info.get('dit_params_b', 0):.1f}B, {info.get('text_encoder', 'as in the folder')}",
            "model_path": model_path,
            "dtype": "float32" if not cuda else "bfloat16",
            "height": args.height, "width": args.width, "batch": args.batch, "num_steps": args.num_steps,
            "guidance_scale": args.guidance_scale,
            "padded_text_encoder_gib": pad_bytes / 2**30,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "model_info": info,
            "command": "python benchmarks/role_memory.py " + " ".join(sys.argv[1:]),
        },
        "rows": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{results['meta']['device_tag']}_{results['meta']['date']}_role_memory_{args.family}{args.tag}"
    passthrough = ["--batch", str(args.batch), "--height", str(args.height), "--width", str(args.width),
                   "--num-steps", str(args.num_steps), "--guidance-scale", str(args.guidance_scale),
                   "--max-sequence-length", str(args.max_sequence_length), "--prompt-words", str(args.prompt_words)]
    if args.text_tokens:
        passthrough += ["--text-tokens", str(args.text_tokens)]
    with tempfile.TemporaryDirectory() as tmp:
        for role in roles:
            child_out = Path(tmp) / f"{role}.json"
            cmd = [sys.executable, __file__, "--child", role, "--child-out", str(child_out), "--model-path", model_path,
                   "--device", "cuda" if cuda else "cpu", "--dtype", results["meta"]["dtype"],
                   "--pad-bytes", str(pad_bytes), *passthrough]
            if args.tiny:
                cmd.append("--tiny")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not child_out.is_file():
                row = {"role": role, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
                print(proc.stderr[-3000:], file=sys.stderr)
            else:
                row = json.loads(child_out.read_text())
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
            (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / stem}.json and .md")
    if any("error" in r for r in results["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
