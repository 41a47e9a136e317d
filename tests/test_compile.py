"""A forward batch is replayed by the graph that sampled it, whatever prompt lengths arrive (issue 19, item 1).

On the CPU the compiled kernels of a recompiled graph happen to agree with the first one, so a gap cannot show the
bug here: these tests count dynamo's graphs instead. The gap guard is tested by forcing a gap.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch._dynamo.utils import counters

from verl_diffusion_rollout.pipelines.compile import compile_blocks
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer

from test_trainer import compose_tiny

# Very different lengths (1 to 40 words): every forward batch of the run brings a text length of its own.
PROMPTS = [
    "cat",
    "a red cat on a mat",
    "a lighthouse on a cliff above a stormy sea at night, waves crashing on the rocks below, a ship in the distance",
    "two birds",
    "an old library with tall wooden shelves, a ladder, dusty books and a reading lamp",
    "a very long prompt about a small dog running through a park in the morning with children playing, trees, a "
    "pond with ducks, a bench, a fountain, people walking, bicycles, kites in a blue sky and clouds",
]


@contextlib.contextmanager
def _trainer(cfg):
    trainer = FlowGRPOTrainer(FlowGRPOConfig.from_omegaconf(cfg))
    try:
        yield trainer
    finally:
        trainer.close()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_run_never_recompiles_after_step_1_and_replays_exactly(tiny_model_path, tmp_path):
    """The trainer's blocks compiled as ``rollout.compile=true`` compiles them (:func:`compile_blocks`), with dynamo's
    ``aot_eager`` backend: graphs, guards and recompiles are dynamo's whatever the backend, and Inductor's CPU code
    generation would cost minutes here (``tests/test_gpu.py`` runs the whole path with Inductor)."""
    torch._dynamo.reset()  # a fresh cache and counters: the blocks' forward is one code object for every engine
    prompts = ",".join(f'"{p}"' for p in PROMPTS)
    cfg = compose_tiny(tiny_model_path, tmp_path / "run", "trainer.total_steps=3", "trainer.save_freq=0",
                       "trainer.plot_freq=0", f"data.prompts=[{prompts}]")
    with _trainer(cfg) as trainer:
        engine = trainer.workers.actor.engine
        compile_blocks(engine.transformer, engine.pipe.family.prepare_block_inputs, backend="aot_eager")
        sampling = trainer.config.rollout.sampling

        def lengths(step: int) -> set[int]:
            drawn, _ = trainer._draw(step)
            return {engine.encode([p], sampling)["prompt_embeds"].shape[1] for p in drawn}

        # a meaningful probe: later steps bring text lengths step 1 never compiled for
        unseen = (lengths(2) | lengths(3)) - lengths(1)
        assert unseen, (lengths(1), lengths(2), lengths(3))
        first = trainer.train_step()
        graphs = _graphs()
        assert graphs > 0  # the blocks did compile
        later = [trainer.train_step() for _ in range(2)]
        assert _graphs() == graphs, f"{_graphs() - graphs} graphs compiled after step 1"
        for metrics in [first, *later]:
            assert metrics["logprob_max_abs_diff_pre_update"] == 0.0
            assert metrics["old_log_probs_recomputed"] == 0


def test_padded_text_tokens_leave_the_transformer_output_unchanged(engine):
    """What the text-length buckets design (benchmarks/compile_text_length.py) relies on, and the all-ones mask the
    compiled blocks get when a batch brings none: masked padding tokens are the same function, in float32."""
    from verl_diffusion_rollout.pipelines.qwenimage import img_shapes_for

    transformer = engine.transformer
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 7, transformer.config.joint_attention_dim, generator=g)
    latents = torch.randn(2, 16, transformer.config.in_channels, generator=g)
    t = torch.tensor([0.7, 0.3])

    def run(embeds, mask):
        with torch.no_grad():
            return transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
                               encoder_hidden_states_mask=mask, img_shapes=img_shapes_for(2, 32, 32, 4),
                               return_dict=False)[0]

    ones = torch.ones(2, 7, dtype=torch.bool)
    plain = run(text, None)
    assert torch.equal(run(text, ones), plain)
    padded = torch.cat([text, torch.randn(2, 9, text.shape[2], generator=g)], dim=1)  # garbage, masked out
    mask = torch.cat([ones, torch.zeros(2, 9, dtype=torch.bool)], dim=1)
    diff = (run(padded, mask) - plain).abs().max().item()
    assert diff <= 1e-6 * plain.abs().max().item(), diff


def test_sd3_text_has_one_length_whatever_the_prompt(sd3_engine, sd3_sampling):
    """SD3's text stream is CLIP's 77 tokens then T5 padded to ``max_sequence_length``: one block shape per config,
    so SD3 needs no dynamic dimension."""
    env = sd3_engine.encode(["a", " ".join(["a long prompt"] * 40)], sd3_sampling)
    assert env["prompt_embeds"].shape[1] == 77 + sd3_sampling.max_sequence_length


def test_gap_guard_recomputes_old_log_probs_and_warns(tiny_model_path, tmp_path, caplog):
    """A rollout whose log-probs are off by 1e-3 (far above the clip range) trains exactly as an exact one: the
    guard warns, names the step and the gap, and the ratio starts at 1 (two mini-batches: the second one's old
    log-probs come from the recompute)."""
    overrides = ("trainer.total_steps=1", "trainer.save_freq=0", "trainer.plot_freq=0",
                 "actor_rollout_ref.actor.mini_batch_size=4")
    with _trainer(compose_tiny(tiny_model_path, tmp_path / "exact", *overrides)) as trainer:
        exact = trainer.train_step()
        exact_lora = trainer.workers.actor.checksum()
    assert exact["old_log_probs_recomputed"] == 0 and exact["logprob_max_abs_diff_pre_update"] == 0.0

    with _trainer(compose_tiny(tiny_model_path, tmp_path / "gap", *overrides)) as trainer:
        actor = trainer.workers.actor
        generate = actor.generate

        def off_by_a_bit(*args, **kwargs):
            result = generate(*args, **kwargs)
            for batch in actor._batches:
                batch.rollout_log_probs = batch.rollout_log_probs + 1e-3 * batch.sde_mask
            return result

        actor.generate = off_by_a_bit
        with caplog.at_level(logging.WARNING, logger="verl_diffusion_rollout.trainer.actor"):
            gapped = trainer.train_step()
        gapped_lora = actor.checksum()
    assert gapped["logprob_max_abs_diff_pre_update"] == pytest.approx(1e-3, rel=1e-3)
    assert gapped["old_log_probs_recomputed"] == 1
    warned = [r.getMessage() for r in caplog.records if "old log-probs" in r.getMessage()]
    assert len(warned) == 1 and "step 1:" in warned[0] and "0.001" in warned[0], warned
    for key in ("ratio_mean", "clipfrac", "policy_loss", "approx_kl", "grad_norm"):
        assert gapped[key] == exact[key], key
    assert gapped_lora == exact_lora


@pytest.mark.parametrize("multiple, dtype, micro", [(1, "float32", 4), (8, "float32", 4), (8, "bfloat16", 2),
                                                   (8, "float32", 8)])
def test_text_token_multiple_pads_every_transformer_text_input_and_replays_exactly(tiny_model_path, tmp_path, multiple,
                                                                                  dtype, micro):
    """``sampling.text_token_multiple``: every text input the blocks see, in the rollout and in the replay, has a
    multiple of that many tokens (masked padding), and the replay still equals the rollout, in float32 and bfloat16
    and at other forward batches. With 1 (the default) the mixed-length prompts reach the blocks at lengths that are
    not multiples of 8, so the assertion can fail."""
    prompts = ",".join(f'"{p}"' for p in PROMPTS)
    cfg = compose_tiny(tiny_model_path, tmp_path / "run", "trainer.total_steps=2", "trainer.save_freq=0",
                       "trainer.plot_freq=0", f"data.prompts=[{prompts}]",
                       f"actor_rollout_ref.rollout.sampling.text_token_multiple={multiple}",
                       f"actor_rollout_ref.rollout.dtype={dtype}", f"actor_rollout_ref.actor.micro_batch_size={micro}")
    with _trainer(cfg) as trainer:
        assert trainer.config.rollout.sampling.text_token_multiple == multiple
        block = trainer.workers.actor.engine.transformer.transformer_blocks[0]
        seen: list[tuple[int, bool]] = []  # (text tokens, grad mode): rollout calls and replay calls

        def record(_module, args, kwargs):
            text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
            seen.append((text.shape[1], torch.is_grad_enabled()))

        block.register_forward_pre_hook(record, with_kwargs=True)
        metrics = [trainer.train_step() for _ in range(2)]
    lengths = {n for n, _ in seen}
    assert {grad for _, grad in seen} == {False, True}  # both the rollout and the replay went through the block
    if multiple == 8:
        assert all(n % 8 == 0 for n in lengths), sorted(lengths)
    else:
        assert any(n % 8 for n in lengths), sorted(lengths)
    for m in metrics:
        assert m["logprob_max_abs_diff_pre_update"] == 0.0 and m["old_log_probs_recomputed"] == 0


@pytest.mark.parametrize("value", [0, 2000, "8", True])
def test_text_token_multiple_must_be_a_positive_int(value):
    from verl_diffusion_rollout.config import DiffusionSamplingConfig

    with pytest.raises(ValueError, match="sampling.text_token_multiple"):
        DiffusionSamplingConfig(text_token_multiple=value)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_memory_budget_keeps_fewer_activations_and_trains_the_same(tiny_model_path, tmp_path,
                                                                               default_activation_memory_budget, dtype):
    """``actor.activation_memory_budget``: the compiled blocks' training graphs keep a fraction of their activations
    for backward and recompute the rest. Over one compiled training step (tiny Qwen-Image, fp32 and bf16, prompts of
    different lengths, blocks compiled with
    ``aot_eager_decomp_partition``, which splits with the same AOT autograd partitioner as Inductor), a budget of 0.1
    saves less than half the bytes, replays exactly, and trains the same LoRA to float32 rounding."""
    functorch_config = default_activation_memory_budget  # torch's default budget, restored afterwards
    prompts = ",".join(f'"{p}"' for p in PROMPTS[:2])
    runs = {}
    for budget in (None, 0.1):
        torch._dynamo.reset()  # graphs compile anew under this budget
        extra = [] if budget is None else [f"++actor_rollout_ref.actor.activation_memory_budget={budget}"]
        cfg = compose_tiny(tiny_model_path, tmp_path / f"run_{budget}", "trainer.total_steps=1", "trainer.save_freq=0",
                           "trainer.plot_freq=0", f"data.prompts=[{prompts}]", "data.samples_per_step=16",
                           "actor_rollout_ref.rollout.compile=true", f"actor_rollout_ref.rollout.dtype={dtype}", *extra)
        with _trainer(cfg) as trainer:
            assert functorch_config.activation_memory_budget == (1.0 if budget is None else budget)
            engine = trainer.workers.actor.engine
            engine.compiled.remove()  # the engine's Inductor compile, swapped for the faster backend (same partitioner)
            compile_blocks(engine.transformer, engine.pipe.family.prepare_block_inputs,
                           backend="aot_eager_decomp_partition")
            saved = [0]

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                saved[0] += tensor.numel() * tensor.element_size()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                metrics = trainer.train_step()
            lora = {n: p.detach().clone() for n, p in trainer.workers.actor.policy.named_params.items()}
        runs[budget] = (saved[0], metrics, lora)
    (full_bytes, full, full_lora), (budget_bytes, bounded, bounded_lora) = runs[None], runs[0.1]
    print(f"saved for backward: {full_bytes / 2**20:.1f} MiB at torch's default, {budget_bytes / 2**20:.1f} MiB at 0.1")
    assert 0 < budget_bytes < 0.5 * full_bytes
    assert full["logprob_max_abs_diff_pre_update"] == 0.0 and bounded["logprob_max_abs_diff_pre_update"] == 0.0
    assert full["grad_norm"] > 0 and bounded["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    assert full_lora.keys() == bounded_lora.keys()
    for name, value in full_lora.items():
        torch.testing.assert_close(bounded_lora[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_memory_budget_is_refused_where_it_would_do_nothing(tiny_model_path, tmp_path):
    key = "actor_rollout_ref.actor.activation_memory_budget"
    bad = {
        ("++" + key + "=1.5", "actor_rollout_ref.rollout.compile=true"): r"must be a number in \[0, 1\] or null, got 1.5",
        ("++" + key + "=true", "actor_rollout_ref.rollout.compile=true"): "must be a number in",
        # the tiny recipe runs eager: no partitioner to bound
        ("++" + key + "=0.5",): "needs actor_rollout_ref.rollout.compile=true",
        ("++" + key + "=0.5", "actor_rollout_ref.rollout.compile=true",
         "actor_rollout_ref.actor.gradient_checkpointing=true"): "set one of the two",
    }
    for overrides, message in bad.items():
        cfg = compose_tiny(tiny_model_path, tmp_path / "run", *overrides)
        with pytest.raises(ValueError, match=message) as err:
            FlowGRPOConfig.from_omegaconf(cfg)
        assert key in str(err.value)
    ok = compose_tiny(tiny_model_path, tmp_path / "run", "++" + key + "=0", "actor_rollout_ref.rollout.compile=true")
    assert FlowGRPOConfig.from_omegaconf(ok).actor.activation_memory_budget == 0
    assert not (tmp_path / "run").exists()  # validation loads nothing and writes nothing
