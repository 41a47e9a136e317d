"""FlowGRPO training entry point (Hydra).

    python -m verl_diffusion_rollout.main_flowgrpo --config-name flowgrpo_tiny
    python -m verl_diffusion_rollout.main_flowgrpo --config-name flowgrpo_qwenimage \
        actor_rollout_ref.model.path=/models/Qwen-Image

Any key can be overridden on the command line (``actor_rollout_ref.rollout.sampling.noise_level=1.0``,
``trainer.resume_from=outputs/flowgrpo_tiny/checkpoints``...).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import verl_diffusion_rollout  # noqa: F401  (registers the diffusion rollout and the config resolvers)
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig


def run(cfg: DictConfig) -> list[dict]:
    """Validate ``cfg``, train, and return the metrics history."""
    from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer

    config = FlowGRPOConfig.from_omegaconf(cfg)
    trainer = FlowGRPOTrainer(config)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    print_summary(history, trainer.out_dir)
    return history


def print_summary(history: list[dict], out_dir) -> None:
    """A short table: reward of the first and last steps, and where the outputs went."""
    if not history:
        return
    k = min(5, len(history))
    first = sum(h["reward_mean"] for h in history[:k]) / k
    last = sum(h["reward_mean"] for h in history[-k:]) / k
    print(f"\nreward, mean of the first {k} steps: {first:.4f}   last {k} steps: {last:.4f}   change: {last - first:+.4f}")
    print(f"metrics: {out_dir}/metrics.jsonl   plot: {out_dir}/reward_curve.png   checkpoints: {out_dir}/checkpoints/")


@hydra.main(config_path="pkg://verl_diffusion_rollout.configs", config_name="flowgrpo_tiny", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
