"""Ulysses sequence parallelism on the CPU (fp32 and bf16, gloo): SP=2 equals SP=1.

Two processes form one SP group (``torch.multiprocessing``, gloo, as verl's workers would) and run the real
engine of each family with the token counts chosen odd, so every stream is padded; the parent runs the same
requests without SP. Then the whole trainer: 2 verl workers on Ray as one SP group against 1 worker.
"""

from __future__ import annotations

import socket

import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.main_flowgrpo import run
from verl_diffusion_rollout.parallel import SequenceParallel, TokenShard
from verl_diffusion_rollout.trainer.checkpoint import load_checkpoint
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
from verl_diffusion_rollout.trainer.policy import SharedPolicy
from verl_diffusion_rollout.trainer.replay import StepReplayer, trainable_steps

from test_trainer import compose_tiny

PROMPTS = ["a red cat", "a blue dog photo with a tree"]
SEEDS = [11, 12, 13, 14]
# 40x24 px -> 5 x 3 = 15 image tokens in both tiny models (VAE factor 4, 2x2 patches); odd text lengths (SD3:
# 77 + 16): every stream is padded to a multiple of 2.
SAMPLING = {
    "qwenimage": DiffusionSamplingConfig(height=40, width=24, num_steps=4, guidance_scale=4.0, noise_level=0.8),
    "sd3": DiffusionSamplingConfig(height=40, width=24, num_steps=4, guidance_scale=4.5, noise_level=0.8,
                                   negative_prompt="", max_sequence_length=16),
}
# Beyond attention: per-token input/output layers and the replicated timestep-modulation layers, whose gradients
# the ranks also split (each rank's tokens use them).
LORA_TARGETS = {
    "qwenimage": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                  "img_in", "txt_in", "proj_out", "img_mod.1"],
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
            "context_embedder", "proj_out", "norm1.linear"],
}
BF16_SAMPLING = SAMPLING["qwenimage"].replace(return_debug=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(engine: DiffusersEngine, family: str) -> dict:
    """One rollout, then the gradient of a FlowGRPO-like loss over its stochastic steps through the same module."""
    local_tokens = []
    block = engine.transformer.transformer_blocks[0]
    hook = block.register_forward_pre_hook(lambda m, a, k: local_tokens.append(k["hidden_states"].shape[1]),
                                           with_kwargs=True)
    batch = engine.generate(PROMPTS, seeds=SEEDS, sampling=SAMPLING[family], n=2)
    hook.remove()
    policy = SharedPolicy(engine.transformer, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[family]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(policy.named_params):  # B != 0, so A and B both get gradients
            if "lora_B" in name:
                policy.named_params[name].copy_(0.05 * torch.randn(policy.named_params[name].shape, generator=generator))
    policy.refresh()
    replayer = StepReplayer(batch, torch.device("cpu"), engine.transformer.dtype)
    weights = torch.linspace(-1.0, 1.0, len(batch))
    loss = sum((replayer.step(engine.transformer, i).log_prob * weights).sum() for i in trainable_steps(batch))
    loss.backward()
    return {
        "responses": batch.responses,
        "all_latents": batch.all_latents,
        "rollout_log_probs": batch.rollout_log_probs,
        "loss": loss.detach(),
        # (the last Qwen-Image block's text output is unused: its to_add_out gets no gradient)
        "grads": {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                  for name, p in policy.named_params.items()},
        "local_tokens": local_tokens[0],
    }


def _naive_log_probs(batch, shard: TokenShard | None) -> torch.Tensor:
    """sglang's naive SP log-prob: each rank sums its shard's Gaussian log-density terms in bf16 and the partial
    sums are all-reduced (in bf16); ``shard=None``: the same sum over the whole buffer on one rank."""
    out = torch.zeros(batch.rollout_log_probs.shape, dtype=torch.bfloat16)
    for i in trainable_steps(batch):
        prev = batch.all_latents[:, i + 1].bfloat16()
        mean = batch.debug["prev_sample_mean"][:, i].bfloat16()
        std = batch.debug["noise_std"][:, i].bfloat16().view(-1, 1, 1)
        terms = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.9189385332046727
        if shard is not None:
            terms = shard.take(terms)
        partial = terms.sum(dim=(1, 2))
        if shard is not None:
            dist.all_reduce(partial)
        out[:, i] = partial / prev[0].numel()
    return out


def _rank_main(rank: int, port: int, paths: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    sp = SequenceParallel.from_group(dist.group.WORLD)
    results = {family: _probe(DiffusersEngine(path, sequence_parallel=sp), family) for family, path in paths.items()}
    engine = DiffusersEngine(paths["qwenimage"], dtype=torch.bfloat16, sequence_parallel=sp)
    batch = engine.generate(PROMPTS, seeds=SEEDS, sampling=BF16_SAMPLING, n=2)
    tokens = batch.all_latents.shape[2]
    results["bf16"] = {"ours": batch.rollout_log_probs, "naive": _naive_log_probs(batch, TokenShard(tokens, sp))}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sp_runs(tiny_model_path, tiny_sd3_model_path, tmp_path_factory):
    """Per rank of an SP=2 group and for SP=1 (this process, same thread count): the probes' results."""
    out = tmp_path_factory.mktemp("sp")
    paths = {"qwenimage": tiny_model_path, "sd3": tiny_sd3_model_path}
    mp.spawn(_rank_main, args=(_free_port(), paths, str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = {family: _probe(DiffusersEngine(path), family) for family, path in paths.items()}
        batch = DiffusersEngine(tiny_model_path, dtype=torch.bfloat16).generate(PROMPTS, seeds=SEEDS,
                                                                              sampling=BF16_SAMPLING, n=2)
        ref["bf16"] = {"ours": batch.rollout_log_probs, "naive": _naive_log_probs(batch, None)}
    finally:
        torch.set_num_threads(threads)
    return ranks, ref


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_sp2_rollout_equals_sp1_bit_for_bit_on_every_rank(sp_runs, family):
    ranks, ref = sp_runs
    full_tokens = ref[family]["local_tokens"]
    for r, result in enumerate(ranks):
        assert full_tokens == 15 and result[family]["local_tokens"] == 8  # each rank ran its padded half
        for key in ("responses", "all_latents", "rollout_log_probs", "loss"):
            diff = (result[family][key] - ref[family][key]).abs().max().item()
            print(f"{family} rank {r} {key}: max |SP=2 - SP=1| = {diff}")
            assert torch.equal(result[family][key], ref[family][key]), (family, r, key, diff)


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_sp_gradients_sum_over_ranks_to_the_sp1_gradient(sp_runs, family):
    """Each rank's shard gets its own gradient once: the ranks' gradients add up to SP=1's, up to the fp32 rounding of
    summing each parameter's per-token terms in two parts (a gather whose backward summed the ranks' identical
    gradients would give twice SP=1's: a relative difference of 1)."""
    ranks, ref = sp_runs
    worst, partial = 0.0, False
    for name, g in ref[family]["grads"].items():
        mine = [r[family]["grads"][name] for r in ranks]
        scale = g.abs().max().item()
        if scale == 0:  # no gradient in SP=1 (the last Qwen-Image block's text output): none on any rank
            assert all(not m.any() for m in mine), name
            continue
        total = mine[0].double() + mine[1].double()
        worst = max(worst, (total - g.double()).abs().max().item() / scale)
        partial = partial or not torch.allclose(mine[0], g)
    print(f"{family}: max over LoRA tensors of |sum of SP=2 rank gradients - SP=1 gradient| / max |SP=1 gradient| = "
          f"{worst:.3g}")
    assert worst <= 1e-5
    assert partial  # the ranks hold partial sums, not each the whole gradient


def test_bf16_full_buffer_log_probs_do_not_drift_but_the_naive_all_reduce_does(sp_runs):
    ranks, ref = sp_runs
    for result in ranks:
        assert torch.equal(result["bf16"]["ours"], ref["bf16"]["ours"])  # every rank, SP=2 == SP=1
    naive_drift = (ranks[0]["bf16"]["naive"].float() - ref["bf16"]["naive"].float()).abs().max().item()
    print(f"bf16: ours SP=2 - SP=1 = 0.0; naive all-reduced partial sums - full sum = {naive_drift}")
    assert torch.equal(ranks[0]["bf16"]["naive"], ranks[1]["bf16"]["naive"])
    assert naive_drift > 0


# -- bad inputs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["trainer.n_gpus_per_node=3", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=3"],
         r"ulysses_sequence_parallel_size=3 does not divide the transformer's 4 attention heads"),
        (["trainer.n_gpus_per_node=3", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"],
         r"= 3 workers do not split into sequence-parallel groups of .*ulysses_sequence_parallel_size=2"),
        (["actor_rollout_ref.actor.ulysses_sequence_parallel_size=0"],
         r"actor_rollout_ref.actor.ulysses_sequence_parallel_size must be an int >= 1, got 0"),
        (["trainer.n_gpus_per_node=4", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
          "data.samples_per_step=4"],
         r"do not split evenly over trainer.nnodes x trainer.n_gpus_per_node = 2 data-parallel groups"),
    ],
)
def test_bad_sequence_parallel_configs_fail_before_any_work(tiny_model_path, tmp_path, overrides, match):
    cfg = compose_tiny(tiny_model_path, tmp_path / "run", *overrides)
    with pytest.raises(ValueError, match=match):
        FlowGRPOConfig.from_omegaconf(cfg)
    assert not (tmp_path / "run").exists()


def test_engine_refuses_a_group_that_does_not_divide_the_heads(tiny_model_path):
    with pytest.raises(ValueError, match=r"ulysses_sequence_parallel_size=3 does not divide the transformer's 4"):
        DiffusersEngine(tiny_model_path, sequence_parallel=SequenceParallel(group=None, size=3, rank=0))


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_a_refused_install_changes_nothing(engine, sd3_engine, small_sampling, sd3_sampling, family):
    eng, sampling = (engine, small_sampling) if family == "qwenimage" else (sd3_engine, sd3_sampling)
    transformer = eng.transformer
    before = eng.generate(PROMPTS, seeds=[1, 2], sampling=sampling)
    processors = dict(transformer.attn_processors)
    with pytest.raises(ValueError, match=r"=3 does not divide the transformer's 4 attention heads"):
        eng.pipe.family.use_sequence_parallel(transformer, SequenceParallel(group=None, size=3, rank=0))
    assert transformer.attn_processors == processors
    assert not transformer._forward_pre_hooks and not transformer._forward_hooks
    after = eng.generate(PROMPTS, seeds=[1, 2], sampling=sampling)
    assert torch.equal(before.all_latents, after.all_latents)


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_a_second_install_is_refused_and_the_first_stays(tiny_model_path, tiny_sd3_model_path, family):
    """Installing sequence parallelism twice names the problem and leaves the first install's processors and hooks;
    removing that one restores the stock processors."""
    eng = DiffusersEngine(tiny_model_path if family == "qwenimage" else tiny_sd3_model_path)
    transformer, stock = eng.transformer, dict(eng.transformer.attn_processors)
    handle = eng.pipe.family.use_sequence_parallel(transformer, SequenceParallel(group=None, size=2, rank=0))
    installed = dict(transformer.attn_processors)
    assert all("SequenceParallel" in type(p).__name__ for p in installed.values())
    hooks = (len(transformer._forward_pre_hooks), len(transformer._forward_hooks))
    with pytest.raises(ValueError, match="sequence parallelism is already installed"):
        eng.pipe.family.use_sequence_parallel(transformer, SequenceParallel(group=None, size=2, rank=0))
    assert transformer.attn_processors == installed
    assert (len(transformer._forward_pre_hooks), len(transformer._forward_hooks)) == hooks
    handle.remove()
    assert transformer.attn_processors == stock
    assert not transformer._forward_pre_hooks and not transformer._forward_hooks


def test_a_group_of_one_leaves_the_model_untouched(tiny_model_path):
    engine = DiffusersEngine(tiny_model_path, sequence_parallel=SequenceParallel(group=None, size=1, rank=0))
    assert engine.sequence_parallel is None and engine.sp_handle is None
    assert not engine.transformer._forward_pre_hooks and not engine.transformer._forward_hooks
    assert not any("Sequence" in type(p).__name__ for p in engine.transformer.attn_processors.values())


# -- the trainer: 2 workers as one SP group vs 1 worker ---------------------------------------------------------------

# The rollouts are bit-identical while the weights are; the LoRA gradients differ by the fp32 rounding of summing
# each token shard's terms separately (~1e-11 on near-zero elements). Two settings keep that from growing:
# FlowGRPO's learning rate (Adam's first step divides each gradient by |g| + eps = 1e-8, so a difference dg becomes
# lr * dg / 1e-8: 1e-5 at the tiny recipe's lr 1e-2, below 1e-6 at 3e-4), and a reward continuous in the pixels
# (the JPEG reward rounds pixels to uint8 and counts bytes: a 1e-8 image difference can flip a pixel and move a
# reward by 1e-4; benchmarks/sp_exactness.py --reward jpeg_compressibility measures it).
TRAIN = ["trainer.total_steps=3", "trainer.save_freq=1", "trainer.check_weights_freq=1", "actor_rollout_ref.actor.lr=3e-4",
         "~reward.functions", "+reward.functions.brightness=1.0"]
COMPARED = ("reward_mean", "reward_std", "policy_loss", "approx_kl", "ratio_mean", "grad_norm", "trained_samples")


@pytest.fixture(scope="module")
def ray_cpu():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_sp2_trainer_equals_one_worker(ray_cpu, tiny_model_path, tmp_path):
    ref = run(compose_tiny(tiny_model_path, tmp_path / "one", *TRAIN))
    sp = run(compose_tiny(tiny_model_path, tmp_path / "sp2", *TRAIN, "trainer.n_gpus_per_node=2",
                          "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"))
    assert [h["step"] for h in sp] == [1, 2, 3]
    for a, b in zip(ref, sp):
        assert a["logprob_max_abs_diff_pre_update"] == 0.0 and b["logprob_max_abs_diff_pre_update"] == 0.0
        for key in COMPARED:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    for step in (1, 2, 3):
        lora_a, _, _ = load_checkpoint(tmp_path / "one" / "checkpoints" / f"step_{step:06d}")
        lora_b, _, _ = load_checkpoint(tmp_path / "sp2" / "checkpoints" / f"step_{step:06d}")
        diff = max((lora_a[k] - lora_b[k]).abs().max().item() for k in lora_a)
        print(f"step {step}: max |LoRA SP=2 - LoRA 1 worker| = {diff:.3g}; reward "
              f"{ref[step - 1]['reward_mean']} vs {sp[step - 1]['reward_mean']}")
        assert sorted(lora_a) == sorted(lora_b) and diff <= 1e-6
