"""GPU paths of the engine (skipped, with the reason, where no CUDA GPU is present; CI has none).

Run on a GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py``; the CPU suite covers the same code
paths on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.trainer.checkpoint import load_checkpoint
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer
from verl_diffusion_rollout.trainer.replay import compute_log_probs, trainable_steps

from test_trainer import compose_tiny

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run with -m gpu on one)"),
]

MIXED_PROMPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts" / "mixed_lengths.txt"
SAMPLING = DiffusionSamplingConfig(height=64, width=64, num_steps=6, sde_window=[1, 3], noise_level=0.9)
PROMPTS = ["a red cat", "a blue dog photo with a tree"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_rollout_replays_exactly(tiny_model_path, dtype, compile):
    engine = DiffusersEngine(tiny_model_path, device="cuda", dtype=dtype, compile=compile)
    for sde_type in ("sde", "cps"):
        batch = engine.generate(PROMPTS, n=2, sampling=SAMPLING.replace(sde_type=sde_type), seeds=[1, 2, 3, 4])
        assert batch.all_latents.device.type == "cpu" and torch.isfinite(batch.all_latents).all()
        with torch.no_grad():
            replayed = compute_log_probs(engine.transformer, batch, trainable_steps(batch)).cpu()
        diff = (replayed - batch.rollout_log_probs[:, trainable_steps(batch)]).abs().max().item()
        print(f"{dtype} compile={compile} {sde_type}: replay max |diff| = {diff}")
        assert diff == 0.0


def _host_syncs(engine, sampling) -> int:
    """Synchronizing CUDA operations (torch's sync debug mode) during one rollout."""
    import warnings

    engine.generate([PROMPTS[0]], n=2, sampling=sampling, seeds=[1, 2])  # warm-up (allocations, caches)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.generate([PROMPTS[0]], n=2, sampling=sampling, seeds=[1, 2])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_cuda_denoising_loop_has_no_per_step_host_sync(tiny_model_path):
    """The host never waits for the device inside the loop (sigma and noise copies are non-blocking): a rollout of
    12 steps adds fewer syncs to one of 4 than it adds steps (the syncs left are per request: copying the results
    back, whose size grows with the trajectory). One prompt and no CFG, so the transformer gets no text mask
    (diffusers' Qwen-Image forward syncs once per call when it does)."""
    engine = DiffusersEngine(tiny_model_path, device="cuda", dtype=torch.bfloat16)
    short = SAMPLING.replace(num_steps=4, sde_window=[1], guidance_scale=1.0)
    long = SAMPLING.replace(num_steps=12, sde_window=[1], guidance_scale=1.0)
    syncs_short, syncs_long = _host_syncs(engine, short), _host_syncs(engine, long)
    print(f"host syncs per rollout: 4 steps {syncs_short}, 12 steps {syncs_long}")
    assert syncs_long - syncs_short < 12 - 4


def test_cuda_ode_matches_stock_diffusers(tiny_model_path):
    from diffusers import QwenImagePipeline

    engine = DiffusersEngine(tiny_model_path, device="cuda", dtype=torch.bfloat16, fast_attention=False,
                             attention_backend="default")
    sampling = SAMPLING.replace(sde_type="ode", batch_cfg=False)
    init = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    ours = engine.pipe([PROMPTS[0]], seeds=[0], sampling=sampling, latents=init.float())
    stock = QwenImagePipeline.from_pretrained(tiny_model_path, dtype=torch.bfloat16).to("cuda")
    stock.set_progress_bar_config(disable=True)
    ref = stock(prompt=PROMPTS[0], negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64, num_inference_steps=6,
                latents=init.cuda(), output_type="latent").images
    assert torch.equal(ours.all_latents[:, -1], ref.float().cpu())


def test_cuda_lora_sync_and_sleep_wake(tiny_model_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    engine = DiffusersEngine(tiny_model_path, device="cuda", dtype=torch.bfloat16)
    before = engine.generate(PROMPTS, sampling=SAMPLING, seeds=[5, 6])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    ref = type(engine.transformer).from_config(engine.transformer.config)
    inject_adapter_in_model(config, ref)
    lora = {k: v * 0.2 for k, v in get_peft_model_state_dict(ref).items()}
    assert engine.update_weights(((k, v.cuda()) for k, v in lora.items()), peft_config=config) == 1
    synced = engine.generate(PROMPTS, sampling=SAMPLING, seeds=[5, 6])
    assert not torch.equal(synced.all_latents, before.all_latents)
    engine.sleep()
    assert all(p.device.type == "cpu" for p in engine.transformer.parameters())
    free_after_sleep = torch.cuda.memory_allocated()
    engine.wake_up()
    assert all(p.device.type == "cuda" for p in engine.transformer.parameters())
    assert torch.cuda.memory_allocated() > free_after_sleep
    again = engine.generate(PROMPTS, sampling=SAMPLING, seeds=[5, 6])
    for key, value in synced.to_dict().items():
        assert torch.equal(value, again.to_dict()[key]), key
    # A sync after the round trip still lands (buffers moved with the weights).
    assert engine.update_weights(((k, v) for k, v in lora.items()), peft_config=config) == 2
    assert torch.equal(engine.generate(PROMPTS, sampling=SAMPLING, seeds=[5, 6]).all_latents, synced.all_latents)


# -- the FlowGRPO trainer on one GPU: the policy trained in place in the rollout's transformer, and resume -------------


@contextlib.contextmanager
def _flowgrpo_trainer(cfg):
    trainer = FlowGRPOTrainer(FlowGRPOConfig.from_omegaconf(cfg))
    try:
        yield trainer
    finally:
        trainer.close()


def _cuda_overrides(dtype: str, *extra: str) -> list[str]:
    return ["actor_rollout_ref.rollout.device=cuda", f"actor_rollout_ref.rollout.dtype={dtype}", *extra]


def _assert_optimizer_state_on_param_devices(optimizer) -> int:
    """Every AdamW state tensor sits on its parameter's device (``step`` excepted: a 0-dim CPU tensor by torch's
    design unless ``fused``/``capturable``). Returns the number of parameters with a state."""
    stated = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            stated += bool(state)
            for key, value in state.items():
                if key == "step" and value.dim() == 0 and value.device.type == "cpu":
                    continue
                assert value.device == p.device, (key, value.device, p.device)
    return stated


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("compile", "text_token_multiple", "memory_budget", "auto_fraction"),
                         [(False, 1, None, None), (True, 1, None, None), (True, 8, None, None), (True, 8, 0.3, None),
                          (True, 8, None, 0.85), (True, 8, None, 1e-6)],
                         ids=["eager", "compile", "compile_pad8", "compile_pad8_amb30", "compile_pad8_ckptauto",
                              "compile_pad8_ckptauto_tight"])
def test_cuda_shared_trainer_exact_and_one_transformer(tiny_model_path, tmp_path, default_activation_memory_budget,
                                                        dtype, compile, text_token_multiple, memory_budget,
                                                        auto_fraction):
    """FlowGRPO on CUDA trains the rollout engine's own transformer in place: one module on the GPU, its base weights
    in the rollout dtype, the LoRA and AdamW state beside it, and the update's replay reproduces the rollout's
    log-probs at every step (the stochastic steps sample under autograd on accelerators, as the replay runs).
    ``compile_pad8`` is the shipped GPU recipe's text padding (``sampling.text_token_multiple: 8``);
    ``compile_pad8_amb30`` adds ``actor.activation_memory_budget=0.3`` (the partitioner recomputes part of the
    activations in backward: the forward graph, and so the gap, must not change). ``ckptauto`` is
    ``actor.checkpoint_blocks=auto`` on the CUDA allocator: with room for every activation (the tiny model on any
    GPU) no block recomputes, and with a target below what is already allocated (``_tight``) every block does."""
    from torch._dynamo.utils import counters

    functorch_config = default_activation_memory_budget  # process-wide: torch's default, restored afterwards

    if compile:  # a fresh recompile budget: the compiled block forward is one code object for every engine here
        torch._dynamo.reset()
    # prompts of 3 to 56 words: the forward batches bring many text lengths, none of which may recompile a block
    cfg = compose_tiny(tiny_model_path, tmp_path / "run", "trainer.total_steps=3", "data.prompts=null",
                       f"data.train_files={MIXED_PROMPTS}",
                       *_cuda_overrides(dtype, f"actor_rollout_ref.rollout.compile={str(compile).lower()}",
                                        "actor_rollout_ref.rollout.sampling.text_token_multiple="
                                        f"{text_token_multiple}",
                                        *([f"++actor_rollout_ref.actor.activation_memory_budget={memory_budget}"]
                                          if memory_budget is not None else []),
                                        *(["actor_rollout_ref.actor.gradient_checkpointing=true",
                                           "actor_rollout_ref.actor.checkpoint_blocks=auto",
                                           f"actor_rollout_ref.actor.checkpoint_memory_fraction={auto_fraction}"]
                                          if auto_fraction is not None else [])))
    with _flowgrpo_trainer(cfg) as trainer:
        actor = trainer.workers.actor
        engine = actor.engine
        # one transformer: the policy trains the module the engine's pipeline samples with
        assert actor.transformer is engine.pipe.transformer and actor.policy.transformer is engine.pipe.transformer
        assert engine.pipe.stochastic_steps_with_grad  # attach_trainer's default on accelerators
        assert actor.device.type == "cuda" and actor.dtype == getattr(torch, dtype)
        history = [trainer.train_step()]
        graphs = counters["stats"]["unique_graphs"]
        history += [trainer.train_step() for _ in range(2)]

        diffs = [h["logprob_max_abs_diff_pre_update"] for h in history]
        assert trainer.config.rollout.sampling.text_token_multiple == text_token_multiple
        assert functorch_config.activation_memory_budget == (1.0 if memory_budget is None else memory_budget)
        print(f"{dtype} compile={compile} text_token_multiple={text_token_multiple}: "
              f"logprob max |diff| pre-update by step = {diffs}, "
              f"graphs after step 1 / 3: {graphs} / {counters['stats']['unique_graphs']}")
        assert counters["stats"]["unique_graphs"] == graphs, "a block recompiled after step 1"
        if auto_fraction is not None:
            plan = actor.policy.checkpointing.plan
            assert plan.activations_per_input_byte > 0  # measured on the allocator
            blocks = len(actor.transformer.transformer_blocks)
            assert [h["recomputed_blocks"] for h in history] == [blocks if auto_fraction < 0.01 else 0] * 3
        else:
            assert all("recomputed_blocks" not in h for h in history)
        assert all(d <= 1e-6 for d in diffs), diffs
        assert [h["old_log_probs_recomputed"] for h in history] == [0, 0, 0]  # the gap guard never had to step in
        if dtype == "float32":
            assert diffs == [0.0, 0.0, 0.0]
        assert [h["weight_version"] for h in history] == [1, 2, 3]  # one in-place weight change per step
        assert all(math.isfinite(h["reward_mean"]) and math.isfinite(h["grad_norm"]) and h["grad_norm"] > 0
                   for h in history)

        transformer = engine.pipe.transformer
        lora_ids = {id(p) for p in actor.policy.params}
        base = [(n, p) for n, p in transformer.named_parameters() if id(p) not in lora_ids]
        assert base and all(p.device.type == "cuda" and p.dtype == getattr(torch, dtype) and not p.requires_grad
                            for _, p in base), [(n, p.device, p.dtype) for n, p in base[:3]]
        merged = [layer.merged_weight for layer in actor.policy.layers.values()]
        assert all(w is not None and w.device.type == "cuda" and w.dtype == getattr(torch, dtype) for w in merged)
        # the LoRA: float32 master weights on the GPU, the optimizer's parameters exactly, and they learned
        assert actor.policy.params and all(p.device.type == "cuda" and p.dtype == torch.float32 and p.requires_grad
                                           for p in actor.policy.params)
        optimized = {id(p) for group in actor.optimizer.param_groups for p in group["params"]}
        assert optimized == lora_ids
        assert any(p.abs().sum() > 0 for n, p in actor.policy.named_params.items() if "lora_B" in n)
        # AdamW's moments live on the GPU next to their parameters, as does the float64 gradient accumulator
        assert _assert_optimizer_state_on_param_devices(actor.optimizer) == len(actor.policy.params)
        assert actor._grad_acc.device.type == "cuda"
        assert all(p.grad is None for p in actor.policy.params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_resume_continues_exactly(tiny_model_path, tmp_path, dtype):
    """A run resumed on CUDA from step 2's checkpoint continues as the uninterrupted run did.

    The optimizer state is loaded from CPU tensors: it must land on the parameters' device (the historic failure was
    AdamW's foreach step raising "Tensors of the same index must be on the same device" at the first step after a
    resume). float32: steps 3 and 4 equal the uninterrupted run's exactly. bfloat16: step 3 (sampled and replayed
    from the restored weights) equals exactly in everything its forward passes determine (rewards, policy loss);
    its grad norm, and through the update every metric of step 4, are compared with a tolerance, since GPU attention
    backward kernels may accumulate in a nondeterministic order and bf16 rounding of the merged weights can amplify a
    last-bit difference of the LoRA (on an H100, 2026-11-23, the bf16 resume was bit-exact at steps 3 and 4 too).
    """
    steps = ["trainer.total_steps=4", "trainer.save_freq=2", *_cuda_overrides(dtype)]
    with _flowgrpo_trainer(compose_tiny(tiny_model_path, tmp_path / "full", *steps)) as trainer:
        full = trainer.fit()
        full_optimizer = trainer.workers.actor.optimizer
        assert _assert_optimizer_state_on_param_devices(full_optimizer) > 0
        full_adam_steps = sorted(float(s["step"]) for s in full_optimizer.state.values())
        full_checksum = trainer.workers.checksums()[0]
    ckpt = tmp_path / "full" / "checkpoints" / "step_000002"
    _, _, saved = load_checkpoint(ckpt)

    with _flowgrpo_trainer(compose_tiny(tiny_model_path, tmp_path / "resumed", *steps,
                                        f"trainer.resume_from={ckpt}")) as trainer:
        actor = trainer.workers.actor
        assert trainer.step == 2 and actor.device.type == "cuda"
        # the restored AdamW state: on the parameters' device (CUDA), bit-identical to the checkpoint's
        params = [p for group in actor.optimizer.param_groups for p in group["params"]]
        ids = [i for group in saved["optimizer"]["param_groups"] for i in group["params"]]
        assert len(ids) == len(params) and all(p.device.type == "cuda" for p in params)
        assert _assert_optimizer_state_on_param_devices(actor.optimizer) == len(params)
        for i, p in zip(ids, params):
            for key, value in saved["optimizer"]["state"][i].items():
                assert torch.equal(actor.optimizer.state[p][key].cpu(), value), (i, key)
        resumed = trainer.fit()  # the first optimizer step after the resume runs on the restored state
        assert _assert_optimizer_state_on_param_devices(actor.optimizer) == len(params)
        assert sorted(float(actor.optimizer.state[p]["step"]) for p in params) == full_adam_steps
        resumed_checksum = trainer.workers.checksums()[0]

    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    keys = ("reward_mean", "reward_std", "policy_loss", "grad_norm")
    for a, b in zip(full[2:], resumed[2:]):
        print(f"{dtype} step {a['step']}: " + ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in keys))
    if dtype == "float32":
        for a, b in zip(full[2:], resumed[2:]):
            for key in keys:
                assert a[key] == b[key], (a["step"], key)
        assert resumed_checksum == full_checksum  # and the final LoRA is bit-identical
        return
    step3_full, step3_resumed = full[2], resumed[2]
    for key in ("reward_mean", "reward_std", "policy_loss"):
        assert step3_full[key] == step3_resumed[key], (3, key)
    assert step3_resumed["grad_norm"] == pytest.approx(step3_full["grad_norm"], rel=1e-2)
    step4_full, step4_resumed = full[3], resumed[3]
    # well inside the spread of the step's rewards (std ~0.06 on the tiny model)
    assert step4_resumed["reward_mean"] == pytest.approx(step4_full["reward_mean"], abs=5e-3)
    assert step4_resumed["reward_std"] == pytest.approx(step4_full["reward_std"], rel=5e-2, abs=1e-3)
    assert step4_resumed["policy_loss"] == pytest.approx(step4_full["policy_loss"], abs=1e-6)
    assert step4_resumed["grad_norm"] == pytest.approx(step4_full["grad_norm"], rel=5e-2)


@pytest.mark.parametrize("compile", [False, True])
def test_cuda_role_chain_equals_monolithic_bf16(tiny_model_path, compile):
    """Encoder -> denoiser -> decoder engines on the GPU in bf16 give the monolithic engine's tensors exactly."""
    kwargs = dict(device="cuda", dtype=torch.bfloat16, compile=compile)
    mono = DiffusersEngine(tiny_model_path, **kwargs)
    encoder, denoiser, decoder = (DiffusersEngine(tiny_model_path, role=r, **kwargs)
                                  for r in ("encoder", "denoiser", "decoder"))
    whole = mono.generate(PROMPTS, n=2, sampling=SAMPLING, seeds=[1, 2, 3, 4])
    env = encoder.encode(PROMPTS, SAMPLING)
    denoised = denoiser.denoise(env, PROMPTS, seeds=[1, 2, 3, 4], sampling=SAMPLING, n=2)
    chained = denoised.with_images(decoder.decode(denoised.final_latents, SAMPLING))
    expected, got = whole.to_dict(), chained.to_dict()
    assert set(expected) == set(got)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_cuda_sglang_protocol(tiny_model_path):
    """sglang's protocol on a bf16 CUDA engine: msgpack answers equal to the native schema's, peak memory reported,
    and the weights' checksum unchanged by a release/resume of the GPU memory."""
    import httpx
    import msgpack

    from verl_diffusion_rollout.server import serve_in_thread
    from test_sglang_protocol import decode

    engine = DiffusersEngine(tiny_model_path, device="cuda", dtype=torch.bfloat16)
    server, address = serve_in_thread(engine, sampling=SAMPLING)
    body = {"prompt": PROMPTS[0], "seed": 7, "num_outputs_per_prompt": 2, "width": 64, "height": 64,
            "num_inference_steps": 6, "rollout_sde_step_indices": [1, 3], "rollout_noise_level": 0.9,
            "rollout_return_dit_trajectory": True}
    try:
        with httpx.Client(base_url=f"http://{address}", timeout=300) as client:
            r = client.post("/rollout/generate", json=body, headers={"Accept": "application/msgpack"})
            assert r.status_code == 200, r.text
            answer = decode(msgpack.unpackb(r.content, raw=False), binary=True)
            native = engine.generate([PROMPTS[0]], seeds=[7, 8], n=2, sampling=SAMPLING)
            for b, response in enumerate(answer):
                assert response["peak_memory_mb"] > 0
                assert torch.equal(response["rollout_log_probs"], native.rollout_log_probs[b])
                assert torch.equal(response["dit_trajectory"]["latents"], native.all_latents[b])
            before = client.post("/get_weights_checksum", json={"module_names": ["transformer"]}).json()
            assert client.post("/release_memory_occupation").json()["sleeping"] is True
            assert client.post("/resume_memory_occupation").json()["sleeping"] is False
            assert client.post("/get_weights_checksum", json={"module_names": ["transformer"]}).json() == before
            print(f"sglang protocol on CUDA: peak_memory_mb={answer[0]['peak_memory_mb']:.0f}")
    finally:
        server.stop()


# -- sequence parallelism over NCCL (2 GPUs) ------------------------------------------------------------------------


def _sp_gpu_rank(rank: int, port: int, paths: dict, dtype: str, compile: bool, out_dir: str) -> None:
    import torch.distributed as dist

    from verl_diffusion_rollout.parallel import SequenceParallel

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    sp = SequenceParallel.from_group(dist.group.WORLD)
    results = {}
    for family, (path, sampling) in paths.items():
        engine = DiffusersEngine(path, device=f"cuda:{rank}", dtype=getattr(torch, dtype), compile=compile,
                                 sequence_parallel=sp)
        batch = engine.generate(PROMPTS, n=2, sampling=sampling, seeds=[1, 2, 3, 4])
        with torch.no_grad():
            replayed = compute_log_probs(engine.transformer, batch, trainable_steps(batch)).cpu()
        results[family] = {"latents": batch.all_latents, "log_probs": batch.rollout_log_probs,
                           "replay_gap": (replayed - batch.rollout_log_probs[:, trainable_steps(batch)]).abs().max().item()}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (sequence parallelism over NCCL)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_cuda_sequence_parallel_over_nccl(tiny_model_path, tiny_sd3_model_path, tmp_path, dtype, compile):
    """SP=2 on 2 GPUs (NCCL all-to-all): both ranks return the same full buffers, the replay on the sequence-parallel
    module gives back the rollout's log-probs exactly, and the result is SP=1's up to GPU kernel choices (printed;
    on the CPU it is SP=1's bit for bit, tests/test_sequence_parallel.py)."""
    import socket

    import torch.multiprocessing as mp

    sd3_sampling = SAMPLING.replace(height=40, width=24, guidance_scale=4.5, negative_prompt="", max_sequence_length=16)
    paths = {"qwenimage": (tiny_model_path, SAMPLING.replace(height=40, width=24)), "sd3": (tiny_sd3_model_path, sd3_sampling)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sp_gpu_rank, args=(port, paths, dtype, compile, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for family, (path, sampling) in paths.items():
        ref = DiffusersEngine(path, device="cuda:0", dtype=getattr(torch, dtype), compile=compile).generate(
            PROMPTS, n=2, sampling=sampling, seeds=[1, 2, 3, 4])
        for key in ("latents", "log_probs"):
            assert torch.equal(ranks[0][family][key], ranks[1][family][key]), (family, key)
        assert ranks[0][family]["replay_gap"] == 0.0 and ranks[1][family]["replay_gap"] == 0.0
        diff_lp = (ranks[0][family]["log_probs"] - ref.rollout_log_probs).abs().max().item()
        diff_x = (ranks[0][family]["latents"] - ref.all_latents).abs().max().item()
        print(f"{family} {dtype} compile={compile}: SP=2 vs SP=1 max |log-prob diff| = {diff_lp:.3g}, "
              f"max |latent diff| = {diff_x:.3g}")
        assert diff_lp <= (1e-5 if dtype == "float32" else 1e-2)


# -- workers take the GPU verl's Worker assigns -------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (one worker per GPU)")
@pytest.mark.parametrize("noset", [False, True], ids=["ray-sets-visible-devices", "noset-visible-devices"])
def test_cuda_workers_land_on_distinct_gpus(tiny_model_path, tmp_path, noset):
    """Two workers on two GPUs, with Ray setting ``CUDA_VISIBLE_DEVICES`` per worker and with
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`` (every worker sees both GPUs; verl's ``Worker`` picks
    ``LOCAL_RANK``): each lands on its own physical GPU, and a step trains to identical weights on both."""
    import ray

    env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if noset else {}
    ray.init(num_gpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        cfg = compose_tiny(tiny_model_path, tmp_path / "run", *_cuda_overrides("float32"), "trainer.total_steps=1",
                           "trainer.n_gpus_per_node=2", "trainer.check_weights_freq=1")
        with _flowgrpo_trainer(cfg) as trainer:
            trainer.fit()
            placements = trainer.workers.placements
        physical = []
        for p in placements:
            index = torch.device(p["device"]).index or 0
            visible = [v for v in p["visible_devices"].split(",") if v]
            physical.append(visible[index] if visible else str(index))
        print(placements)
        assert len(set(physical)) == 2, placements
    finally:
        ray.shutdown()
