"""Memory over a long FlowGRPO run: host RSS (and, on a GPU, allocated and reserved memory) after every RL step.

    python benchmarks/long_run_memory.py                         # CPU, the tiny offline Qwen-Image, 200 steps
    python benchmarks/long_run_memory.py --device cuda           # the same on a GPU (adds torch.cuda.memory_*)

The tiny recipe (``flowgrpo_tiny``) runs ``--steps`` RL steps in this process, with a checkpoint every
``--save-freq`` steps (``trainer.max_actor_ckpt_to_keep=2``, so checkpointing and pruning are part of the loop).
After ``--warmup`` steps memory must be flat: the report gives the growth from the end of the warm-up to the end
and the slope of a least-squares line over the post-warm-up steps (MiB per 100 steps).

Writes ``<device>_<date>_long_run_memory.{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import verl_diffusion_rollout  # noqa: E402,F401  (registers the rollout and the config resolvers)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
MIB = 2**20


def host_rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def slope_per_100(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index, times 100."""
    n = len(values)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return 100 * num / den


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--save-freq", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a diffusers Qwen-Image folder (default: the tiny offline one)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from tqdm.auto import tqdm

    from verl_diffusion_rollout.testing import make_tiny_qwenimage
    from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
    from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer
    from verl_diffusion_rollout.visualize import save_curves

    work = Path(tempfile.mkdtemp(prefix="long_run_memory_"))
    model = args.model or make_tiny_qwenimage(work / "tiny-qwenimage")
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    overrides = [
        f"actor_rollout_ref.model.path={model}", f"trainer.output_dir={work / 'run'}", f"trainer.total_steps={args.steps}",
        f"trainer.save_freq={args.save_freq}", "trainer.max_actor_ckpt_to_keep=2", "trainer.plot_freq=0",
        "trainer.logger=[file]", "trainer.progress_bar=false", f"actor_rollout_ref.rollout.device={args.device}",
        f"actor_rollout_ref.rollout.dtype={dtype}", "data.samples_per_step=4", "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.sampling.num_steps=3", "actor_rollout_ref.actor.micro_batch_size=2",
        "actor_rollout_ref.actor.mini_batch_size=2",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="flowgrpo_tiny", overrides=overrides)
    trainer = FlowGRPOTrainer(FlowGRPOConfig.from_omegaconf(cfg))
    cuda = args.device.startswith("cuda")
    rows = []
    try:
        for _ in tqdm(range(args.steps), desc="long run"):
            metrics = trainer.train_step()
            row = {"step": trainer.step, "host_rss_mib": host_rss_bytes() / MIB, "step_s": metrics["step_s"]}
            if cuda:
                torch.cuda.synchronize()
                row["gpu_allocated_mib"] = torch.cuda.memory_allocated() / MIB
                row["gpu_reserved_mib"] = torch.cuda.memory_reserved() / MIB
            rows.append(row)
        trainer.save()
    finally:
        trainer.close()

    keys = ["host_rss_mib"] + (["gpu_allocated_mib", "gpu_reserved_mib"] if cuda else [])
    after = rows[args.warmup - 1 :] if len(rows) >= args.warmup else rows
    summary = {
        key: {
            "at_warmup_end": after[0][key],
            "at_end": after[-1][key],
            "growth_after_warmup": after[-1][key] - after[0][key],
            "max_after_warmup": max(r[key] for r in after),
            "slope_per_100_steps": slope_per_100([r[key] for r in after]),
        }
        for key in keys
    }
    command = "python benchmarks/long_run_memory.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    tag = f"{'CPU' if not cuda else torch.cuda.get_device_name().split()[-1]}_{args.date}_long_run_memory"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": command, "date": args.date, "device": device, "torch": torch.__version__,
              "overrides": overrides[2:], "warmup": args.warmup, "summary": summary, "rows": rows}
    (out / f"{tag}.json").write_text(json.dumps(report, indent=1))
    save_curves({k: [r[k] for r in rows] for k in keys}, out / f"{tag}.png",
                title=f"memory over {args.steps} FlowGRPO steps (tiny recipe, {args.device})", xlabel="RL step")
    lines = [f"# Memory over a long run: {args.steps} FlowGRPO steps of the tiny recipe", "",
             f"`{command}` — {device}, torch {torch.__version__}, {args.date}.", "",
             f"Checkpoint every {args.save_freq} steps, 2 kept. Warm-up: the first {args.warmup} steps.", "",
             "| quantity (MiB) | end of warm-up | end | growth after warm-up | max after warm-up | slope / 100 steps |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, s in summary.items():
        lines.append(f"| {key} | {s['at_warmup_end']:.1f} | {s['at_end']:.1f} | {s['growth_after_warmup']:+.1f} | "
                     f"{s['max_after_warmup']:.1f} | {s['slope_per_100_steps']:+.2f} |")
    lines += ["", f"![memory]({tag}.png)", ""]
    (out / f"{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
