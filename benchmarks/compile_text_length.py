"""Compiled FlowGRPO over prompts of many lengths: how many graphs each compile design builds, and the step time.

    python benchmarks/compile_text_length.py                     # tiny Qwen-Image on the CPU, every design
    python benchmarks/compile_text_length.py --designs dynamic --device cuda --dtype bfloat16

A forward batch must be replayed by the graph that sampled it (issue 19). Designs, each in a fresh process (dynamo's
caches and counters are per process), each the whole FlowGRPO step of ``flowgrpo_tiny`` (rollout, reward, replay,
update) through :class:`~verl_diffusion_rollout.trainer.flowgrpo.FlowGRPOTrainer` with the prompts of
``--prompts`` (default ``benchmarks/prompts/mixed_lengths.txt``, 3 to 56 words):

* ``auto``: what the engine did before: each block ``Module.compile()``'d with dynamo's defaults (a second text
  length promotes the dimension to dynamic: a new graph, and the first one stays);
* ``buckets``: the text the transformer sees padded with masked tokens to a multiple of ``--bucket`` tokens
  (``sampling.text_token_multiple``; the replay pads alike), blocks compiled with automatic dynamic shapes off:
  one static graph per bucket;
* ``dynamic``: the product (``rollout.compile=true``, :func:`~verl_diffusion_rollout.pipelines.compile.compile_blocks`):
  automatic dynamic shapes off, the text-token dimension marked dynamic before every block call;
* ``dynamic_padded``: ``dynamic`` with ``sampling.text_token_multiple=8``, so every text length is a multiple of 8
  and Inductor's ``% 8`` alignment guards (seen on the GPU with a warm FX-graph cache) cannot split a graph.

Reported per step: dynamo's graphs so far (``unique_graphs``: every graph it built, first compiles and recompiles),
the step's seconds, the pre-update log-prob gap, and the text lengths the step's forward batches brought.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG_DIR = str(ROOT / "configs")
DEFAULT_PROMPTS = str(ROOT / "benchmarks" / "prompts" / "mixed_lengths.txt")
DESIGNS = ("auto", "buckets", "dynamic", "dynamic_padded")


def run_design(args) -> dict[str, Any]:
    """One design in this process: ``--steps`` trainer steps; returns the per-step rows."""
    from hydra import compose, initialize_config_dir
    from torch._dynamo.utils import counters

    import verl_diffusion_rollout  # noqa: F401  (registers the rollout)
    from verl_diffusion_rollout.pipelines.compile import compile_blocks
    from verl_diffusion_rollout.testing import tiny_qwenimage_path
    from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
    from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer

    design = args.worker
    out_dir = tempfile.mkdtemp(prefix=f"compile_text_length_{design}_")
    overrides = [
        f"actor_rollout_ref.model.path={args.model_path or tiny_qwenimage_path()}",
        f"actor_rollout_ref.rollout.device={args.device}",
        f"actor_rollout_ref.rollout.dtype={args.dtype}",
        f"actor_rollout_ref.rollout.compile={str(design in ('dynamic', 'dynamic_padded')).lower()}",
        # the product's masked text padding: buckets of --bucket tokens, or multiples of 8 with the dynamic dimension
        f"actor_rollout_ref.rollout.sampling.text_token_multiple="
        f"{ {'buckets': args.bucket, 'dynamic_padded': 8}.get(design, 1) }",
        f"actor_rollout_ref.rollout.n={args.n}",
        f"actor_rollout_ref.actor.micro_batch_size={args.n}",
        f"actor_rollout_ref.rollout.sampling.num_steps={args.num_steps}",
        "data.prompts=null",
        f"data.train_files={args.prompts}",
        f"data.samples_per_step={args.samples}",
        f"trainer.output_dir={out_dir}",
        f"trainer.total_steps={args.steps}",
        "trainer.save_freq=0",
        "trainer.plot_freq=0",
        "trainer.logger=[file]",
        "trainer.progress_bar=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = FlowGRPOConfig.from_omegaconf(compose(config_name="flowgrpo_tiny", overrides=overrides))
    trainer = FlowGRPOTrainer(cfg)
    engine = trainer.workers.actor.engine
    pipe = engine.pipe
    encode = pipe.encode_denoising_env
    if design == "auto":
        torch._dynamo.config.recompile_limit = 64
        for block in pipe.transformer.transformer_blocks:
            block.compile()
    elif design == "buckets":
        compile_blocks(pipe.transformer, None)  # automatic dynamic shapes off, nothing marked dynamic
    sampling = cfg.rollout.sampling
    rows = []
    try:
        for step in range(1, args.steps + 1):
            drawn, _ = trainer._draw(step)
            lengths = sorted({int(encode([p], sampling, pipe._execution_device)["prompt_embeds"].shape[1])
                              for p in drawn})  # before any padding
            start = time.perf_counter()
            metrics = trainer.train_step()
            rows.append({
                "step": step,
                "text_lengths": lengths,
                "graphs": int(counters["stats"]["unique_graphs"]),
                "step_s": round(time.perf_counter() - start, 3),
                "gap": metrics.get("logprob_max_abs_diff_pre_update"),
                "old_log_probs_recomputed": metrics.get("old_log_probs_recomputed"),
            })
            print(json.dumps({"design": design, **rows[-1]}), flush=True)
    finally:
        trainer.close()
    return {"design": design, "steps": rows}


def markdown(result: dict[str, Any]) -> str:
    info = result["info"]
    lines = [
        f"# Compiled FlowGRPO over prompts of many lengths ({info['device']}, {info['date']})",
        "",
        f"`{info['command']}`",
        "",
        f"torch {info['torch']}, {info['cpu']} ({info['threads']} threads, machine shared with other jobs: "
        "seconds are indicative), tiny Qwen-Image, `flowgrpo_tiny` with "
        f"{info['samples']} samples per step, groups of {info['n']}, {info['num_steps']} sampling steps, prompts "
        f"from `{info['prompts']}`; `buckets` pads to multiples of {info['bucket']} tokens.",
        "",
        "| design | graphs after step 1 | graphs at the end | compiled after step 1 | step 1 s | later steps s (median) "
        "| max pre-update gap | text lengths seen |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in result["designs"]:
        steps = run["steps"]
        later = sorted(s["step_s"] for s in steps[1:])
        median = later[len(later) // 2] if later else float("nan")
        seen = sorted({n for s in steps for n in s["text_lengths"]})
        gap = max((s["gap"] or 0.0) for s in steps)
        first, last = steps[0]["graphs"], steps[-1]["graphs"]
        lines.append(
            f"| `{run['design']}` | {first} | {last} | {last - first} "
            f"| {steps[0]['step_s']:.1f} | {median:.2f} | {gap:.3g} | {len(seen)} lengths, {seen[0]}..{seen[-1]} |"
        )
    lines += ["", "Per step (graphs so far / seconds):", ""]
    for run in result["designs"]:
        cells = ", ".join(f"{s['graphs']}/{s['step_s']:.1f}" for s in run["steps"])
        lines.append(f"- `{run['design']}`: {cells}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated, of {list(DESIGNS)}")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=8, help="samples per step")
    parser.add_argument("--n", type=int, default=4, help="group size (= the forward batch: one prompt per batch)")
    parser.add_argument("--num-steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--bucket", type=int, default=32, help="text-length bucket of the buckets design (tokens)")
    parser.add_argument("--prompts", default=DEFAULT_PROMPTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model-path", default=None, help="a Qwen-Image folder (default: the tiny test model)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tag", default="compile_text_length")
    parser.add_argument("--worker", choices=DESIGNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_design(args)), flush=True)
        return

    designs = []
    for design in args.designs.split(","):
        cmd = [sys.executable, __file__, "--worker", design, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"design {design} failed:\n{proc.stderr[-4000:]}")
        designs.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(designs[-1]), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    info = {
        "device": device, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "command": "python benchmarks/compile_text_length.py " + " ".join(sys.argv[1:]),
        "samples": args.samples, "n": args.n, "num_steps": args.num_steps, "bucket": args.bucket,
        "prompts": os.path.relpath(args.prompts, ROOT),
    }
    result = {"info": info, "designs": designs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / f"{'CPU' if device == 'CPU' else device.split()[-1]}_{info['date']}_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
