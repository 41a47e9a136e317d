"""Sequence parallelism end to end: the tiny FlowGRPO recipes on DP x SP worker layouts, compared step by step.

    python benchmarks/sp_exactness.py                                   # CPU, gloo: 1x1 vs 1x2 and 2x1 vs 2x2
    python benchmarks/sp_exactness.py --device cuda --dtype bfloat16    # GPUs, NCCL (needs 4 GPUs for 2x2)

Each pair ``REFxSP`` runs the recipe (``flowgrpo_tiny`` for Qwen-Image, ``flowgrpo_sd3_tiny`` for SD3.5, on their
tiny offline models) first with the reference layout (``DP`` workers, ``ulysses_sequence_parallel_size=1``), then
with the same data-parallel count and ``S`` workers per group, on the recipe's own trainer (verl workers on Ray),
with the same seeds. Reported per step: the reward, the pre-update log-prob gap of both runs, the largest LoRA
difference after the step (from the checkpoints) and the step time. The learning rate is FlowGRPO's (3e-4; see
``tests/test_sequence_parallel.py`` for why a larger one magnifies summation-order differences through Adam), and
the reward by default one continuous in the pixels (``--reward``): the recipes' JPEG reward rounds pixels to uint8
and counts bytes, so the ~1e-8 image differences that the LoRA's ~1e-7 differences make can flip a pixel and move
a reward by 1e-4, after which the two runs train on different advantages.

Writes ``<device>_<date>_sp_exactness_<reward>.{json,md}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import verl_diffusion_rollout  # noqa: E402,F401  (registers the rollout and the config resolvers)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
RECIPES = {"qwenimage": "flowgrpo_tiny", "sd3": "flowgrpo_sd3_tiny"}
COMPARED = ("reward_mean", "policy_loss", "grad_norm", "approx_kl")


def compose(recipe: str, out_dir: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(config_name=recipe, overrides=[f"trainer.output_dir={out_dir}", *overrides])


def run_layout(recipe: str, out_dir: Path, dp: int, sp: int, common: list[str]) -> list[dict]:
    from verl_diffusion_rollout.main_flowgrpo import run

    overrides = [*common, f"trainer.n_gpus_per_node={dp * sp}",
                 f"actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp}"]
    return run(compose(recipe, out_dir, overrides))


def lora_diff(a: Path, b: Path) -> float:
    from verl_diffusion_rollout.trainer.checkpoint import load_checkpoint

    lora_a, _, _ = load_checkpoint(a)
    lora_b, _, _ = load_checkpoint(b)
    if sorted(lora_a) != sorted(lora_b):
        raise RuntimeError(f"{a} and {b} hold different LoRA tensors")
    return max((lora_a[k].float() - lora_b[k].float()).abs().max().item() for k in lora_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["qwenimage", "sd3", "both"], default="both")
    parser.add_argument("--layouts", default="1x1:1x2,2x1:2x2",
                        help="comma-separated REF:SP pairs of DPxS layouts (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--reward", default="brightness",
                        help="reward function (default: %(default)s, continuous in the pixels; jpeg_compressibility, "
                             "the recipes' own, is quantised: uint8 pixels and a file size)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()

    import ray

    pairs = [tuple(tuple(int(v) for v in layout.split("x")) for layout in pair.split(":"))
             for pair in args.layouts.split(",")]
    workers = max(dp * sp for pair in pairs for dp, sp in pair)
    if args.device == "cpu":
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        torch.set_num_threads(1)  # the workers compute with the driver's thread count
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    common = [
        f"trainer.total_steps={args.steps}", "trainer.save_freq=1", "trainer.check_weights_freq=1",
        "trainer.progress_bar=false", "trainer.logger=[file]", "trainer.plot_freq=0", "data.val_prompts=null",
        f"actor_rollout_ref.rollout.device={args.device}", f"actor_rollout_ref.rollout.dtype={args.dtype}",
        f"actor_rollout_ref.actor.lr={args.lr}", "~reward.functions", f"+reward.functions.{args.reward}=1.0",
        "data.samples_per_step=16", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.micro_batch_size=4",
        "actor_rollout_ref.rollout.sampling.num_steps=4",
    ]
    families = ["qwenimage", "sd3"] if args.family == "both" else [args.family]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            for (dp_ref, sp_ref), (dp, sp) in pairs:
                base = Path(tmp) / family
                ref_dir, sp_dir = base / f"{dp_ref}x{sp_ref}", base / f"{dp}x{sp}_vs_{dp_ref}x{sp_ref}"
                ref = run_layout(RECIPES[family], ref_dir, dp_ref, sp_ref, common)
                out = run_layout(RECIPES[family], sp_dir, dp, sp, common)
                for a, b in zip(ref, out):
                    step = a["step"]
                    ckpt = f"checkpoints/step_{step:06d}"
                    rows.append({
                        "family": family, "reference": f"{dp_ref}x{sp_ref}", "layout": f"{dp}x{sp}", "step": step,
                        "reward_ref": a["reward_mean"], "reward": b["reward_mean"],
                        **{f"abs_diff_{k}": abs(a[k] - b[k]) for k in COMPARED},
                        "gap_pre_update_ref": a["logprob_max_abs_diff_pre_update"],
                        "gap_pre_update": b["logprob_max_abs_diff_pre_update"],
                        "lora_max_abs_diff": lora_diff(ref_dir / ckpt, sp_dir / ckpt),
                        "step_s_ref": a["step_s"], "step_s": b["step_s"],
                    })
                    print(json.dumps(rows[-1]))
    ray.shutdown()

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    stamp = datetime.date.today().isoformat()
    tag = "CPU" if args.device == "cpu" else device.replace(" ", "_")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": stamp, "device": device, "torch": torch.__version__, "host_cpus": torch.get_num_threads(),
            "command": "python benchmarks/sp_exactness.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "dtype": args.dtype, "lr": args.lr, "reward": args.reward}
    name = f"{tag}_{stamp}_sp_exactness_{args.reward}"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Sequence parallelism: DP x SP layouts vs their SP=1 reference ({stamp}, {device}, {args.dtype})", "",
             f"`{meta['command']}` (torch {torch.__version__}; tiny recipes, 16 samples per step, lr {args.lr}, "
             f"reward {args.reward})", "",
             "| family | layout vs reference | step | reward (ref / SP) | pre-update gap (ref / SP) | max abs LoRA diff "
             "| max abs diff policy_loss / grad_norm | step s (ref / SP) |",
             "| --- | --- | ---: | --- | --- | ---: | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['layout']} vs {r['reference']} | {r['step']} | {r['reward_ref']:.6f} / "
            f"{r['reward']:.6f} | {r['gap_pre_update_ref']:.3g} / {r['gap_pre_update']:.3g} | "
            f"{r['lora_max_abs_diff']:.3g} | {r['abs_diff_policy_loss']:.3g} / {r['abs_diff_grad_norm']:.3g} | "
            f"{r['step_s_ref']:.2f} / {r['step_s']:.2f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
