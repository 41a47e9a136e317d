"""Does the merged bf16 forward learn as well as peft's unmerged layers? The tiny recipes, both ways, several seeds.

    nice python benchmarks/merged_vs_unmerged.py                      # CPU, bf16: 2 families x 2 modes x 3 seeds x 30 steps
    python benchmarks/merged_vs_unmerged.py --family sd3 --seeds 0 --steps 5    # a quick look

Each run is the recipe itself (``flowgrpo_tiny`` for Qwen-Image, ``flowgrpo_sd3_tiny`` for SD3.5, on their tiny
offline models, JPEG-compressibility reward) with the rollout and training in ``--dtype`` and
``actor_rollout_ref.rollout.lora.merge`` true (``W + s B A`` rounded once into bf16, :class:`MergedLoRALinear`) or
false (peft's ``W x + s B (A x)``, the LoRA branch in float32), and ``trainer.seed`` set per seed (LoRA
initialisation and prompt draws). The LoRA masters and Adam are float32 in both modes; only the forward differs.

Reported per (family, mode): the reward gain (mean of the last 5 steps minus the first 5) per seed, its mean and
spread over seeds, and the largest pre-update log-prob gap (exact replay holds in both modes). "Measurably worse"
means a mean gain below the other mode's by more than the two spreads combined.

Every finished run is kept in ``<out>/<prefix>_merged_vs_unmerged_runs.json`` and skipped when the script is run
again (so an interrupted sweep resumes; ``--report-only`` summarizes the runs finished so far). Writes ``<prefix>_merged_vs_unmerged.{json,md,png}`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import verl_diffusion_rollout  # noqa: E402,F401  (registers the rollout and the config resolvers)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
RECIPES = {"qwenimage": "flowgrpo_tiny", "sd3": "flowgrpo_sd3_tiny"}
MODES = {"merged": "true", "unmerged": "false"}
WINDOW = 5  # steps averaged at each end of a curve


def compose(recipe: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(config_name=recipe, overrides=overrides)


def run_one(family: str, mode: str, seed: int, steps: int, dtype: str, device: str) -> dict:
    """One training run; returns its per-step rewards, pre-update gaps and wall time."""
    from verl_diffusion_rollout.main_flowgrpo import run

    with tempfile.TemporaryDirectory() as out_dir:
        overrides = [
            f"trainer.output_dir={out_dir}", f"trainer.total_steps={steps}", f"trainer.seed={seed}",
            "trainer.save_freq=0", "trainer.plot_freq=0", "trainer.logger=[file]", "trainer.progress_bar=false",
            f"actor_rollout_ref.rollout.dtype={dtype}", f"actor_rollout_ref.rollout.device={device}",
            f"actor_rollout_ref.rollout.lora.merge={MODES[mode]}",
        ]
        start = time.perf_counter()
        history = run(compose(RECIPES[family], overrides))
        wall = time.perf_counter() - start
    return {
        "family": family, "mode": mode, "seed": seed, "steps": steps, "wall_s": wall,
        "reward_mean": [float(h["reward_mean"]) for h in history],
        "logprob_gap": [float(h["logprob_max_abs_diff_pre_update"]) for h in history],
    }


def gain(rewards: list[float]) -> float:
    k = min(WINDOW, len(rewards))
    return sum(rewards[-k:]) / k - sum(rewards[:k]) / k


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for family in RECIPES:
        for mode in MODES:
            mine = sorted((r for r in runs if r["family"] == family and r["mode"] == mode), key=lambda r: r["seed"])
            if not mine:
                continue
            gains = [gain(r["reward_mean"]) for r in mine]
            rows.append({
                "family": family, "mode": mode, "seeds": [r["seed"] for r in mine], "steps": mine[0]["steps"],
                "gain_per_seed": gains, "gain_mean": statistics.fmean(gains),
                "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                "final_reward_mean": statistics.fmean(sum(r["reward_mean"][-WINDOW:]) / len(r["reward_mean"][-WINDOW:])
                                                      for r in mine),
                "max_logprob_gap": max(max(r["logprob_gap"]) for r in mine),
                "wall_s_mean": statistics.fmean(r["wall_s"] for r in mine),
            })
    return rows


def verdicts(rows: list[dict]) -> dict[str, str]:
    out = {}
    for family in RECIPES:
        by_mode = {r["mode"]: r for r in rows if r["family"] == family}
        if set(by_mode) != set(MODES):
            continue
        m, u = by_mode["merged"], by_mode["unmerged"]
        delta = m["gain_mean"] - u["gain_mean"]
        margin = m["gain_std"] + u["gain_std"]
        out[family] = (f"merged - unmerged gain {delta:+.4f} (spreads {m['gain_std']:.4f} + {u['gain_std']:.4f}): "
                       + ("merged measurably worse" if delta < -margin else "no measurable difference"
                          if abs(delta) <= margin else "merged measurably better"))
    return out


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in RECIPES if any(r["family"] == f for r in runs)]
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4), squeeze=False)
    colors = {"merged": "tab:blue", "unmerged": "tab:orange"}
    for ax, family in zip(axes[0], families):
        for run in sorted((r for r in runs if r["family"] == family), key=lambda r: (r["mode"], r["seed"])):
            steps = range(1, len(run["reward_mean"]) + 1)
            ax.plot(steps, run["reward_mean"], color=colors[run["mode"]], alpha=0.8,
                    linestyle=["-", "--", ":"][run["seed"] % 3], label=f"{run['mode']} seed {run['seed']}")
        ax.set_title(f"{RECIPES[family]} ({family})")
        ax.set_xlabel("step")
        ax.set_ylabel("reward mean (JPEG compressibility)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, rows: list[dict], verdict: dict[str, str], meta: dict) -> None:
    lines = [
        f"# Merged vs unmerged LoRA forward in {meta['dtype']} ({meta['date']}, {meta['device']})", "",
        f"`{meta['command']}` (torch {meta['torch']}; tiny recipes, {meta['steps']} steps, seeds {meta['seeds']}, "
        f"reward gain = mean of the last {WINDOW} steps minus the first {WINDOW})", "",
        "| family | mode | reward gain per seed | gain mean ± std | final reward (mean) | max pre-update gap | s per run |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        per_seed = ", ".join(f"{g:+.4f}" for g in r["gain_per_seed"])
        lines.append(f"| {r['family']} | {r['mode']} | {per_seed} | {r['gain_mean']:+.4f} ± {r['gain_std']:.4f} | "
                     f"{r['final_reward_mean']:.4f} | {r['max_logprob_gap']:.3g} | {r['wall_s_mean']:.0f} |")
    lines += ["", *[f"- {family}: {text}" for family, text in verdict.items()], ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=[*RECIPES, "both"], default="both")
    parser.add_argument("--modes", default="merged,unmerged")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--report-only", action="store_true", help="summarize the finished runs; run nothing")
    args = parser.parse_args()

    families = list(RECIPES) if args.family == "both" else [args.family]
    modes = [m for m in args.modes.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    prefix = f"{args.device.upper()}_{args.date}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / f"{prefix}_merged_vs_unmerged_runs.json"
    runs: list[dict] = json.loads(cache.read_text()) if cache.exists() else []
    done = {(r["family"], r["mode"], r["seed"], r["steps"]) for r in runs}
    # Seed-major order: an interrupted sweep still holds both modes of the first seeds.
    for seed in seeds:
        for family in families:
            for mode in modes:
                if args.report_only or (family, mode, seed, args.steps) in done:
                    continue
                print(f"== {family} {mode} seed {seed}: {args.steps} steps", flush=True)
                runs.append(run_one(family, mode, seed, args.steps, args.dtype, args.device))
                cache.write_text(json.dumps(runs, indent=1))
    runs = [r for r in runs if r["steps"] == args.steps and r["seed"] in seeds and r["family"] in families]
    rows = summarize(runs)
    verdict = verdicts(rows)
    meta = {
        "date": args.date, "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or 'x86_64'})",
        "dtype": args.dtype, "steps": args.steps, "seeds": seeds, "torch": torch.__version__,
        "command": "python benchmarks/merged_vs_unmerged.py " + shlex.join(sys.argv[1:]),
    }
    (out / f"{prefix}_merged_vs_unmerged.json").write_text(
        json.dumps({"meta": meta, "summary": rows, "verdict": verdict, "runs": runs}, indent=1))
    write_markdown(out / f"{prefix}_merged_vs_unmerged.md", rows, verdict, meta)
    plot(runs, out / f"{prefix}_merged_vs_unmerged.png",
         f"merged vs unmerged LoRA forward, {args.dtype}, {args.device}, {args.date}")
    print((out / f"{prefix}_merged_vs_unmerged.md").read_text())


if __name__ == "__main__":
    main()
