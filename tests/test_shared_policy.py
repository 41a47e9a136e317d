"""The policy trained in place in the rollout's own transformer: one copy of the weights, exact replay."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig

from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.main_flowgrpo import run
from verl_diffusion_rollout.testing import TINY_QWENIMAGE_DIMS
from verl_diffusion_rollout.trainer.actor import MiniBatchPlan
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer
from verl_diffusion_rollout.trainer.policy import MergedLoRALinear, SharedPolicy
from verl_diffusion_rollout.trainer.rewards import build_reward

from test_trainer import compose_tiny

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def tiny_transformer(dtype=torch.float32):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**TINY_QWENIMAGE_DIMS["transformer"]).to(dtype)


def forward(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = transformer.dtype
    x = torch.randn(2, 64, 16, generator=g).to(dtype)
    text = torch.randn(2, 7, 32, generator=g).to(dtype)
    return transformer(hidden_states=x, timestep=torch.tensor([0.5, 0.8], dtype=dtype), encoder_hidden_states=text,
                       encoder_hidden_states_mask=None, img_shapes=[[(1, 8, 8)]] * 2, return_dict=False)[0]


def randomize_lora(policy, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# -- the LoRA layer ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weights_stay_bit_identical_over_100_switches(dtype):
    transformer = tiny_transformer(dtype)
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    policy = SharedPolicy(transformer, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert all(isinstance(layer, MergedLoRALinear) for layer in policy.layers.values())
    for i in range(100):  # an optimizer step changes the LoRA; the switch back to sampling re-derives the merge
        randomize_lora(policy, i)
        policy.refresh()
    for name, layer in policy.layers.items():
        w = layer.get_base_layer().weight
        assert torch.equal(w, base[f"{name}.weight"]), name
        expected = (w.float() + layer.get_delta_weight("default").float()).to(dtype)
        assert torch.equal(layer.merged_weight, expected), name  # one rounding, from the base copy: no drift
    assert policy.params[0].dtype == torch.float32  # master weights train in float32
    with torch.no_grad(), policy.reference():
        assert torch.equal(forward(transformer), forward(_plain(base, dtype)))


def _plain(state, dtype):
    model = tiny_transformer(dtype)
    model.load_state_dict(state)
    return model


def test_merged_layers_compute_the_lora_function_and_its_gradients():
    merged = SharedPolicy(tiny_transformer(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), merged=True)
    plain = SharedPolicy(tiny_transformer(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), merged=False)
    assert not any(isinstance(layer, MergedLoRALinear) for layer in plain.layers.values())
    for policy in (merged, plain):
        randomize_lora(policy, 7)
        policy.refresh()
    y_merged, y_plain = forward(merged.transformer), forward(plain.transformer)
    # W x + s B A x computed as (W + s B A) x: the same function up to float32 rounding
    torch.testing.assert_close(y_merged, y_plain, rtol=0, atol=2e-6)
    (y_merged**2).sum().backward()
    (y_plain**2).sum().backward()
    for a, b in zip(merged.params, plain.params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    with torch.no_grad():  # sampling computes bit for bit what training computes
        assert torch.equal(forward(merged.transformer), y_merged.detach())


def test_unsupported_lora_configs_are_refused_before_touching_the_model():
    transformer = tiny_transformer()
    for config, match in [
        (LoraConfig(r=4, target_modules=TARGETS, use_dora=True), "use_dora=True"),
        (LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.1), "lora_dropout=0.1"),
        (LoraConfig(r=4, target_modules=TARGETS, rank_pattern={"to_q": 8}), "rank_pattern"),
    ]:
        with pytest.raises(ValueError, match=match):
            SharedPolicy(transformer, config)
    assert not any("lora" in name for name, _ in transformer.named_parameters())
    with pytest.raises(ValueError, match=r"actor_rollout_ref.model.target_modules=\['nomatch'\] match no module"):
        SharedPolicy(transformer, LoraConfig(r=4, target_modules=["nomatch"]))


# -- partial gradient checkpointing -----------------------------------------------------------------------------------


SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _tiny(family):
    if family == "qwenimage":
        return tiny_transformer(), forward
    from diffusers import SD3Transformer2DModel

    from verl_diffusion_rollout.testing import TINY_SD3_DIMS

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY_SD3_DIMS["transformer"])

    def sd3_forward(transformer, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 4, 8, 8, generator=g)
        text = torch.randn(2, 7, 32, generator=g)
        pooled = torch.randn(2, 32, generator=g)
        return transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                           timestep=torch.tensor([500.0, 800.0]), return_dict=False)[0]

    return model, sd3_forward


def _block_calls_and_grads(family, prepare=None, **policy_kwargs):
    """Forward + backward of a LoRA'd tiny transformer; per-block forward calls (a recomputed block runs twice) and
    the LoRA gradients. ``prepare(policy)`` runs before the forward."""
    transformer, run = _tiny(family)
    targets = TARGETS if family == "qwenimage" else SD3_TARGETS
    policy = SharedPolicy(transformer, LoraConfig(r=4, lora_alpha=8, target_modules=targets), **policy_kwargs)
    randomize_lora(policy, 3)
    policy.refresh()
    if prepare is not None:
        prepare(policy)
    blocks = list(policy.transformer.transformer_blocks)
    calls = [0] * len(blocks)
    for k, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    (run(policy.transformer) ** 2).sum().backward()
    return calls, [p.grad for p in policy.params]  # None for the last block's unused text-stream output


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_checkpoint_blocks_recomputes_exactly_the_first_n_blocks_and_keeps_the_gradients(family):
    plain_calls, plain_grads = _block_calls_and_grads(family)
    n_blocks = len(plain_calls)
    assert n_blocks >= 2 and plain_calls == [1] * n_blocks
    for count, expected in [(None, [2] * n_blocks), (1, [2] + [1] * (n_blocks - 1)), (0, [1] * n_blocks)]:
        calls, grads = _block_calls_and_grads(family, gradient_checkpointing=True, checkpoint_blocks=count)
        assert calls == expected, count
        assert sum(g is not None for g in grads) > len(grads) // 2
        for a, b in zip(grads, plain_grads):  # a recompute computes the same forward: the same gradients
            assert (a is None and b is None) or torch.equal(a, b), count


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_partial_checkpointing_trains_exactly_as_full_checkpointing(tiny_model_path, tmp_path, dtype):
    """Two RL steps with one of the two blocks recomputed train the same LoRA, bit for bit, as with both recomputed
    (a recompute computes the same forward), and the replay equals the rollout at every step."""
    checksums = {}
    for count in ("null", "1"):
        cfg = compose_tiny(tiny_model_path, tmp_path / count, "trainer.total_steps=2", "trainer.save_freq=0",
                           "trainer.plot_freq=0", f"actor_rollout_ref.rollout.dtype={dtype}",
                           "actor_rollout_ref.actor.gradient_checkpointing=true",
                           f"actor_rollout_ref.actor.checkpoint_blocks={count}")
        t = FlowGRPOTrainer(FlowGRPOConfig.from_omegaconf(cfg))
        try:
            metrics = [t.train_step() for _ in range(2)]
            checksums[count] = t.workers.actor.checksum()
        finally:
            t.close()
        assert all(m["logprob_max_abs_diff_pre_update"] == 0.0 for m in metrics), count
        assert metrics[-1]["grad_norm"] > 0  # the LoRA did train
    assert checksums["1"] == checksums["null"]


def test_checkpoint_blocks_past_the_block_count_is_refused_naming_the_key():
    n_blocks = TINY_QWENIMAGE_DIMS["transformer"]["num_layers"]
    transformer = tiny_transformer()
    with pytest.raises(ValueError, match=rf"checkpoint_blocks={n_blocks + 1} is not in \[0, {n_blocks}\]"):
        SharedPolicy(transformer, LoraConfig(r=4, target_modules=TARGETS), gradient_checkpointing=True,
                     checkpoint_blocks=n_blocks + 1)
    assert not any("lora" in name for name, _ in transformer.named_parameters())  # refused before the adapter
    assert not transformer.gradient_checkpointing


# -- the trainer: one transformer ----------------------------------------------------------------------------------


@pytest.fixture
def trainer(tiny_model_path, tmp_path):
    t = FlowGRPOTrainer(FlowGRPOConfig.from_omegaconf(compose_tiny(tiny_model_path, tmp_path / "run")))
    yield t
    t.close()


def test_rollout_and_trainer_share_one_transformer(trainer):
    actor = trainer.workers.actor
    engine_transformer = actor.engine.pipe.transformer
    assert actor.transformer is engine_transformer and actor.policy.transformer is engine_transformer
    layer = engine_transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, MergedLoRALinear)
    # the optimizer trains exactly the LoRA parameters of that module, nothing else
    optimized = {id(p) for group in actor.optimizer.param_groups for p in group["params"]}
    lora = {id(p) for name, p in engine_transformer.named_parameters() if "lora_" in name}
    assert optimized == lora and all(p.requires_grad == (id(p) in lora) for p in engine_transformer.parameters())
    version = actor.engine.weight_version
    trainer.train_step()
    # the update lands in the engine's own weights: new version, and the merged weight moved from the base weight
    assert actor.engine.weight_version == version + 1
    assert not torch.equal(layer.merged_weight, layer.get_base_layer().weight)
    with pytest.raises(ValueError, match="trains this engine's transformer in place"):
        actor.engine.update_weights([("transformer_blocks.0.attn.to_q.lora_A.weight", torch.zeros(8, 64))])


def test_first_step_samples_exactly_what_a_plain_engine_samples(trainer, tiny_model_path):
    """Before any update the policy is the base model: the shared mode reproduces a rollout without a trainer."""
    cfg = trainer.config
    prompts, seeds = trainer._draw(1)
    rows = [p for p in prompts for _ in range(cfg.group_size)]
    ours = trainer.workers.actor.generate(rows, seeds, step=1)
    plain = DiffusersEngine(tiny_model_path, device="cpu", dtype=torch.float32)
    reward = build_reward(cfg.reward.functions, cfg.reward.options)
    micro = cfg.actor.micro_batch_size
    expected = [
        reward(plain.generate(rows[i : i + micro], seeds[i : i + micro], cfg.rollout.sampling, window_seed=1).responses,
               rows[i : i + micro])[0]
        for i in range(0, len(rows), micro)
    ]
    assert torch.equal(ours.rewards, torch.cat(expected))


# -- exact replay in every mode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["actor_rollout_ref.actor.micro_batch_size=2"], id="micro-below-group"),
        pytest.param(["actor_rollout_ref.rollout.lora.merge=false"], id="unmerged-peft-layers"),
        pytest.param(["actor_rollout_ref.actor.kl_beta=0.1"], id="kl"),
        pytest.param(["actor_rollout_ref.actor.recompute_old_log_probs=true"], id="recomputed-old-log-probs"),
        pytest.param(["actor_rollout_ref.rollout.sampling.sde_type=cps",
                      "actor_rollout_ref.rollout.sampling.sde_window_size=2"], id="cps-window"),
        pytest.param(["actor_rollout_ref.rollout.sampling.guidance_scale=1.0",
                      "actor_rollout_ref.actor.mini_batch_size=4"], id="no-cfg-two-minibatches"),
    ],
)
def test_replayed_log_probs_equal_the_rollouts_at_every_step(tiny_model_path, tmp_path, overrides):
    history = run(compose_tiny(tiny_model_path, tmp_path / "run", "trainer.total_steps=2", *overrides))
    assert [h["logprob_max_abs_diff_pre_update"] for h in history] == [0.0, 0.0]
    assert all(h["grad_norm"] > 0 for h in history)
    if any("kl_beta" in o for o in overrides):
        assert history[1]["kl"] > 0


def test_autograd_stochastic_steps_replay_exactly(trainer):
    """The accelerator setting (stochastic rollout steps under autograd, as the update runs them), on the CPU."""
    actor = trainer.workers.actor
    actor.engine.pipe.stochastic_steps_with_grad = True
    prompts, seeds = trainer._draw(1)
    n = trainer.config.group_size
    result = actor.generate([p for p in prompts for _ in range(n)], seeds, step=1)
    keep = torch.ones(len(seeds), dtype=torch.bool)
    plan = [MiniBatchPlan(forward_batches=list(range(len(seeds) // actor.micro)), kept=len(seeds))]
    out = actor.update(torch.randn(len(seeds)), keep, plan)
    assert out.logprob_max_abs_diff_pre_update == 0.0 and out.count > 0
    assert result.rewards.shape == (len(seeds),)
    assert out.grad_norms[0] > 0
