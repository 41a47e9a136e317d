"""Recipe values that used to fail late (after the model loaded) or with a bare ZeroDivisionError / KeyError: each is
now a ValueError naming its key (or file and line) before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from verl_diffusion_rollout.trainer.config import DataConfig, FlowGRPOConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_tiny(model_path, out_dir, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(
            config_name="flowgrpo_tiny",
            overrides=[
                f"actor_rollout_ref.model.path={model_path}",
                f"trainer.output_dir={out_dir}",
                "trainer.progress_bar=false",
                *overrides,
            ],
        )


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.samples_per_step=0", "data.samples_per_step"),
        ("data.samples_per_step=-16", "data.samples_per_step"),
        ("++reward.rollout_chunks=2", "reward.rollout_chunks"),  # removed key: refused by name
        ("actor_rollout_ref.actor.weight_decay=-1", "actor_rollout_ref.actor.weight_decay"),
        ("++actor_rollout_ref.actor.adam_betas=[2,3]", "actor_rollout_ref.actor.adam_betas"),
        ("++actor_rollout_ref.actor.adam_betas=[0.9]", "actor_rollout_ref.actor.adam_betas"),
        ("++actor_rollout_ref.actor.dtype=bfloat16", "actor_rollout_ref.actor.dtype"),  # removed key
        ("actor_rollout_ref.actor.micro_batch_size=3", "actor_rollout_ref.actor.micro_batch_size"),
        ("trainer.n_gpus_per_node=0", "trainer.n_gpus_per_node"),
        ("trainer.n_gpus_per_node=3", "trainer.n_gpus_per_node"),
        ("trainer.check_weights_freq=-1", "trainer.check_weights_freq"),
        ("actor_rollout_ref.actor.lr=nan", "actor_rollout_ref.actor.lr"),
        ("actor_rollout_ref.actor.mini_batch_size=0", "actor_rollout_ref.actor.mini_batch_size"),
        ("trainer.save_freq=-1", "trainer.save_freq"),
        ("trainer.plot_freq=-1", "trainer.plot_freq"),
        ("trainer.total_steps=0", "trainer.total_steps"),
        ("++actor_rollout_ref.actor.checkpoint_blocks=-1", "actor_rollout_ref.actor.checkpoint_blocks"),
        ("++actor_rollout_ref.actor.checkpoint_blocks=2.5", "actor_rollout_ref.actor.checkpoint_blocks"),
        # without gradient checkpointing (the tiny recipe's default) the key would do nothing: refused
        ("++actor_rollout_ref.actor.checkpoint_blocks=1", "actor_rollout_ref.actor.gradient_checkpointing=true"),
    ],
)
def test_bad_values_name_their_key_before_any_model_loads(tmp_path, override, key):
    # An existing folder that is not a diffusers model: reaching the model would fail with another message.
    not_a_model = tmp_path / "empty_model"
    not_a_model.mkdir()
    cfg = compose_tiny(not_a_model, tmp_path / "run", override)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        FlowGRPOConfig.from_omegaconf(cfg)
    assert not isinstance(err.value, ZeroDivisionError) and "diffusers model folder" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_blocks=many"],
         "actor_rollout_ref.actor.checkpoint_blocks must be an int >= 0, auto or null, got 'many'"),
        (["actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_blocks=auto",
          "actor_rollout_ref.actor.checkpoint_memory_fraction=1.5"],
         r"actor_rollout_ref.actor.checkpoint_memory_fraction must be a number in \(0, 1\]"),
        (["actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_memory_fraction=0.5"],
         "checkpoint_memory_fraction=0.5 bounds what actor_rollout_ref.actor.checkpoint_blocks=auto keeps"),
        (["actor_rollout_ref.actor.checkpoint_blocks=auto"], "actor_rollout_ref.actor.gradient_checkpointing=true"),
        (["actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_blocks=1.5"],
         "actor_rollout_ref.actor.checkpoint_blocks must be an int >= 0, auto or null, got 1.5"),
        # each sequence-parallel worker would plan its own blocks; a block's all-to-alls must match across the group
        (["actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_blocks=auto",
          "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", "trainer.n_gpus_per_node=2"],
         "checkpoint_blocks=auto lets each worker choose its own recomputed blocks, but with "
         "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"),
        # the tiny recipe runs on the CPU, which has no allocator statistics to plan from
        (["actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_blocks=auto"],
         "checkpoint_blocks=auto plans from the CUDA allocator's memory; actor_rollout_ref.rollout.device='cpu'"),
    ],
)
def test_auto_checkpointing_refusals_name_their_keys(tiny_model_path, tmp_path, overrides, message):
    cfg = compose_tiny(tiny_model_path, tmp_path / "run", *overrides)
    with pytest.raises(ValueError, match=message):
        FlowGRPOConfig.from_omegaconf(cfg)
    assert not (tmp_path / "run").exists()


def test_valid_edges_are_accepted(tiny_model_path, tmp_path):
    cfg = compose_tiny(tiny_model_path, tmp_path / "run", "trainer.save_freq=0", "trainer.plot_freq=0",
                       "actor_rollout_ref.actor.weight_decay=0", "++actor_rollout_ref.actor.adam_betas=[0,0.5]")
    config = FlowGRPOConfig.from_omegaconf(cfg)
    assert config.trainer.save_freq == 0 and config.actor.adam_betas == (0.0, 0.5)


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a red cat"}\n\n{"prompt": "a dog", "extra": 1}\n')
    assert DataConfig(train_files=str(good)).load_prompts() == ["a red cat", "a dog"]
    cases = {
        '{"prompt": "a cat"}\n{"text": "no prompt"}\n': ":2: a JSON object with a 'prompt' field",
        '{"prompt": "a cat"}\n\n{not json\n': ":3: not valid JSON",
        '["a list"]\n': ":1: a JSON object",
        '{"prompt": 5}\n': ":1: 'prompt' must be a non-empty string",
    }
    for text, message in cases.items():
        path = tmp_path / "prompts.jsonl"
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path}{message}"):
            DataConfig(train_files=str(path)).load_prompts()
