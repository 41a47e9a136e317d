"""Generate one GRPO group with per-step log-probs and save it as an image grid.

    python examples/generate_group.py                      # tiny offline Qwen-Image, CPU
    python examples/generate_group.py --model-path /models/Qwen-Image --device cuda --dtype bfloat16 \
        --height 512 --width 512 --steps 10

Without --model-path a tiny random Qwen-Image is built once into ~/.cache/verl_diffusion_rollout (its images are
noise-like: the weights are random; the point is the machinery).
"""

from __future__ import annotations

import argparse

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.testing import tiny_qwenimage_path
from verl_diffusion_rollout.visualize import save_image_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", help="diffusers Qwen-Image folder (default: the tiny offline model)")
    parser.add_argument("--prompt", default="a red cat sitting on a blue house")
    parser.add_argument("--n", type=int, default=4, help="samples in the group")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--sde-type", default="sde", choices=["sde", "cps", "ode"])
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i")
    parser.add_argument("--out", default="outputs/group.png")
    args = parser.parse_args()

    model_path = args.model_path or tiny_qwenimage_path()
    engine = DiffusersEngine(model_path, device=args.device, dtype=args.dtype, progress_bar=True)
    sampling = DiffusionSamplingConfig(
        height=args.height, width=args.width, num_steps=args.steps, sde_type=args.sde_type,
        noise_level=args.noise_level, guidance_scale=args.guidance_scale,
    )
    seeds = [args.seed + i for i in range(args.n)]
    batch = engine.generate([args.prompt], seeds=seeds, sampling=sampling, n=args.n)

    print(f"model: {model_path}\nprompt: {args.prompt!r}  ({args.n} samples, {args.steps} {args.sde_type} steps)")
    print("per-step log-probs (0 = deterministic step):")
    header = "seed      " + " ".join(f"{'t' + str(i):>8}" for i in range(batch.num_steps))
    print(header)
    for seed, row in zip(batch.seeds.tolist(), batch.rollout_log_probs.tolist()):
        print(f"{seed:<9} " + " ".join(f"{v:8.4f}" for v in row))
    total = batch.rollout_log_probs.sum(dim=1).tolist()
    captions = [f"seed {s}  logp {lp:.2f}" for s, lp in zip(batch.seeds.tolist(), total)]
    path = save_image_grid(batch.responses, args.out, captions)
    print("timings: " + ", ".join(f"{k} {v:.3f}" for k, v in batch.timings.items()))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
