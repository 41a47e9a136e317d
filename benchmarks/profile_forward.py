"""Where a DiT forward's time goes: torch.profiler's top CUDA kernels for one batched-CFG forward.

    python benchmarks/profile_forward.py --resolution 512 --batch 16 [--compile]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout_bench import build_dit, compiled_blocks, make_env, our_pipeline  # noqa: E402

from verl_diffusion_rollout.pipelines.qwenimage import (  # noqa: E402
    TextConditioning,
    attention_backend,
    img_shapes_for,
    predict_velocity,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attn", default="auto")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    dit = build_dit(False, device, dtype)
    pipe = our_pipeline(dit, args.attn)
    env = make_env(args.batch, 64, 8, dit.config.joint_attention_dim, device, dtype, True)
    text = TextConditioning.build(**env, guidance_scale=4.0, batch_cfg=True, dtype=dtype)
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(args.batch)]
    x = pipe.prepare_rollout_latents(gens, args.resolution, args.resolution, device)
    shapes = img_shapes_for(args.batch, args.resolution, args.resolution, 8)
    t = torch.full((args.batch,), 500.0, device=device)
    with torch.no_grad(), compiled_blocks(dit, args.compile), attention_backend(args.attn, device):
        for _ in range(2):
            predict_velocity(dit, x, t, text, shapes)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            predict_velocity(dit, x, t, text, shapes)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70)
    print(table)


if __name__ == "__main__":
    main()
