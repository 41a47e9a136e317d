"""In-memory LoRA / full-weight sync into DiffusersEngine: exactness, atomicity, memory."""

from __future__ import annotations

import gc
import re

import psutil
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from verl_diffusion_rollout.config import DiffusionSamplingConfig, LoRASyncConfig
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.lora import WeightUpdateError, canonical_name

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SAMPLING = DiffusionSamplingConfig(height=64, width=64, num_steps=4, sde_type="sde", noise_level=0.8)
PROMPTS = ["a red cat", "a blue dog photo"]
SEEDS = [11, 12]


def peft_config(rank: int = 4, alpha: float = 8.0) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)


def random_lora(transformer, config: LoraConfig, seed: int, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    """A random LoRA state dict named as peft writes it, built from a peft-wrapped copy of the architecture."""
    from peft import inject_adapter_in_model

    ref = type(transformer).from_config(transformer.config)
    inject_adapter_in_model(config, ref)
    g = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(ref)
    return {prefix + k: torch.randn(v.shape, generator=g) * 0.2 for k, v in state.items()}


@pytest.fixture
def fresh_engine(tiny_model_path):
    return DiffusersEngine(tiny_model_path)


def outputs(engine) -> dict[str, torch.Tensor]:
    return engine.generate(PROMPTS, seeds=SEEDS, sampling=SAMPLING).to_dict()


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def peft_reference(tiny_model_path, config: LoraConfig, lora: dict[str, torch.Tensor]):
    """An engine whose transformer carries the LoRA through peft itself (unmerged adapter layers)."""
    ref = DiffusersEngine(tiny_model_path)
    ref.transformer.add_adapter(config)
    state = {canonical_name(k): v for k, v in lora.items()}
    result = set_peft_model_state_dict(ref.transformer, state)
    assert not result.unexpected_keys
    return ref


def test_names_as_peft_writes_them_are_canonicalized():
    assert canonical_name("base_model.model.transformer_blocks.0.attn.to_q.lora_A.default.weight") == (
        "transformer_blocks.0.attn.to_q.lora_A.weight"
    )
    assert canonical_name("transformer.transformer_blocks.1.attn.to_out.0.lora_B.weight") == (
        "transformer_blocks.1.attn.to_out.0.lora_B.weight"
    )
    assert canonical_name("base_model.model.proj_out.base_layer.weight") == "proj_out.weight"


def test_merged_lora_sync_changes_outputs_and_matches_peft(fresh_engine, tiny_model_path):
    before = outputs(fresh_engine)
    config = peft_config()
    lora = random_lora(fresh_engine.transformer, config, seed=0)
    version = fresh_engine.update_weights(iter(lora.items()), peft_config=config)
    assert version == 1 == fresh_engine.weight_version
    after = fresh_engine.generate(PROMPTS, seeds=SEEDS, sampling=SAMPLING)
    assert after.weight_version == 1
    assert (after.responses - before["responses"]).abs().max() > 1e-3
    ref = peft_reference(tiny_model_path, config, lora).generate(PROMPTS, seeds=SEEDS, sampling=SAMPLING)
    # merged (W + s B A) vs unmerged (W x + s B A x): equal up to float32 rounding
    torch.testing.assert_close(after.all_latents, ref.all_latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(after.rollout_log_probs, ref.rollout_log_probs, rtol=0, atol=1e-4)


def test_adapter_mode_is_bit_identical_to_peft(tiny_model_path):
    engine = DiffusersEngine(tiny_model_path, lora=LoRASyncConfig(merge=False))
    config = peft_config()
    lora = random_lora(engine.transformer, config, seed=1, prefix="transformer.")
    engine.update_weights(lora.items(), peft_config=config)
    ref = peft_reference(tiny_model_path, config, lora)
    assert_same_outputs(outputs(engine), outputs(ref))


def test_lora_from_rollout_config_when_no_peft_config(tiny_model_path):
    engine = DiffusersEngine(tiny_model_path, lora=LoRASyncConfig(rank=4, alpha=8.0, target_modules=TARGETS))
    lora = random_lora(engine.transformer, peft_config(), seed=2)
    engine.update_weights(lora.items())
    ref = peft_reference(tiny_model_path, peft_config(), lora)
    torch.testing.assert_close(outputs(engine)["all_latents"], outputs(ref)["all_latents"], rtol=0, atol=1e-4)


def test_zero_lora_b_is_exactly_the_base_model(fresh_engine):
    before = outputs(fresh_engine)
    config = peft_config()
    lora = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in random_lora(fresh_engine.transformer, config, 3).items()}
    fresh_engine.update_weights(lora.items(), peft_config=config)
    assert_same_outputs(before, outputs(fresh_engine))


@pytest.mark.parametrize("corruption", ["shape", "unknown", "nan", "missing", "inf", "int_dtype"])
def test_bad_update_raises_and_leaves_weights_untouched(fresh_engine, corruption):
    config = peft_config()
    good = random_lora(fresh_engine.transformer, config, seed=4)
    fresh_engine.update_weights(good.items(), peft_config=config)
    before = outputs(fresh_engine)
    bad = dict(random_lora(fresh_engine.transformer, config, seed=5))
    victim = sorted(bad)[len(bad) // 2]
    if corruption == "shape":
        bad[victim] = torch.zeros(bad[victim].shape[0], bad[victim].shape[1] + 1)
    elif corruption == "unknown":
        bad["base_model.model.transformer_blocks.0.attn.to_zz.lora_A.weight"] = torch.zeros(4, 4)
        victim = "to_zz"
    elif corruption == "nan":
        bad[victim][0, 0] = float("nan")
    elif corruption == "inf":
        bad[victim][-1, -1] = float("inf")
    elif corruption == "missing":
        del bad[victim]
    elif corruption == "int_dtype":
        bad[victim] = bad[victim].to(torch.int32)
    with pytest.raises(WeightUpdateError, match=victim.split("base_model.model.")[-1] if corruption != "unknown" else victim):
        fresh_engine.update_weights(bad.items(), peft_config=config)
    assert fresh_engine.weight_version == 1
    assert_same_outputs(before, outputs(fresh_engine))


def test_hundred_syncs_reuse_memory_and_never_drift(fresh_engine, tiny_model_path):
    config = peft_config()
    loras = [random_lora(fresh_engine.transformer, config, seed=s) for s in range(3)]
    fresh_engine.update_weights(loras[0].items(), peft_config=config)
    base = {n: p.detach().clone() for n, p in fresh_engine.transformer.named_parameters() if "lora_" not in n}
    ptrs = {n: p.data_ptr() for n, p in fresh_engine.transformer.named_parameters()}
    merged = {n: b.data_ptr() for n, b in fresh_engine.transformer.named_buffers() if n.endswith("merged_weight")}
    assert len(merged) == len(fresh_engine._lora.spec.modules)
    staging = fresh_engine._lora._pending.flat.data_ptr()
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    for i in range(100):
        fresh_engine.update_weights(loras[i % 3].items(), peft_config=config)
    gc.collect()
    growth = psutil.Process().memory_info().rss - rss_before
    assert fresh_engine.weight_version == 101
    assert {n: p.data_ptr() for n, p in fresh_engine.transformer.named_parameters()} == ptrs
    assert {n: b.data_ptr() for n, b in fresh_engine.transformer.named_buffers() if n in merged} == merged
    assert fresh_engine._lora._pending.flat.data_ptr() == staging
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 100 syncs"
    # The base weights are never written: the merge lives beside them.
    for n, p in fresh_engine.transformer.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    # No drift: after 101 syncs weights and merged weights equal those of one sync of the last LoRA.
    once = DiffusersEngine(tiny_model_path)
    once.update_weights(loras[99 % 3].items(), peft_config=config)
    reference = dict(once.transformer.named_parameters()) | dict(once.transformer.named_buffers())
    live = dict(fresh_engine.transformer.named_parameters()) | dict(fresh_engine.transformer.named_buffers())
    assert live.keys() == reference.keys()
    for n, p in live.items():
        assert torch.equal(p, reference[n]), n


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_lora_config_change_replaces_the_layers(tiny_model_path, merge):
    engine = DiffusersEngine(tiny_model_path, lora=LoRASyncConfig(merge=merge))
    base = {canonical_name(n): p.detach().clone() for n, p in engine.transformer.named_parameters()}
    first = peft_config(rank=4)
    engine.update_weights(random_lora(engine.transformer, first, 6).items(), peft_config=first)
    second = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False)
    lora = random_lora(engine.transformer, second, 7)
    engine.update_weights(lora.items(), peft_config=second)
    attn = engine.transformer.transformer_blocks[0].attn
    assert type(attn.to_v) is torch.nn.Linear and attn.to_q.lora_A["default"].weight.shape[0] == 2
    assert {canonical_name(n): p for n, p in engine.transformer.named_parameters() if "lora_" not in n}.keys() == base.keys()
    for n, p in engine.transformer.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[canonical_name(n)]), n  # the base weights were never written
    ref = peft_reference(tiny_model_path, second, lora)
    torch.testing.assert_close(outputs(engine)["all_latents"], outputs(ref)["all_latents"], rtol=0, atol=1e-4)


def test_full_weight_update(fresh_engine, tiny_model_path):
    before = outputs(fresh_engine)
    g = torch.Generator().manual_seed(8)
    new = {f"transformer.{n}": p.detach() + 0.01 * torch.randn(p.shape, generator=g) for n, p in fresh_engine.transformer.named_parameters()}
    assert fresh_engine.update_weights(new.items()) == 1
    after = outputs(fresh_engine)
    assert not torch.equal(before["all_latents"], after["all_latents"])
    ref = DiffusersEngine(tiny_model_path)
    with torch.no_grad():
        for n, p in ref.transformer.named_parameters():
            p.copy_(new[f"transformer.{n}"])
    assert_same_outputs(after, outputs(ref))
    # A partial full-weight update is refused whole.
    partial = dict(list(new.items())[:-1])
    with pytest.raises(WeightUpdateError, match="missing 1 of"):
        fresh_engine.update_weights(partial.items())
    assert_same_outputs(after, outputs(fresh_engine))


def test_empty_update_is_rejected(fresh_engine):
    with pytest.raises(WeightUpdateError, match="empty weight update"):
        fresh_engine.update_weights(iter(()))
    assert fresh_engine.weight_version == 0


def test_sleep_and_wake_keep_generation_identical(fresh_engine):
    config = peft_config()
    fresh_engine.update_weights(random_lora(fresh_engine.transformer, config, 9).items(), peft_config=config)
    before = outputs(fresh_engine)
    fresh_engine.sleep()
    assert fresh_engine.is_sleeping
    with pytest.raises(RuntimeError, match="asleep"):
        outputs(fresh_engine)
    fresh_engine.wake_up()
    assert_same_outputs(before, outputs(fresh_engine))


def test_rejected_first_adapter_update_leaves_the_model_unwrapped(tiny_model_path):
    engine = DiffusersEngine(tiny_model_path, lora=LoRASyncConfig(merge=False))
    before = outputs(engine)
    modules = [n for n, _ in engine.transformer.named_modules()]
    config = peft_config()
    bad = random_lora(engine.transformer, config, seed=12)
    victim = sorted(bad)[0]
    bad[victim][0, 0] = float("nan")
    with pytest.raises(WeightUpdateError, match="NaN"):
        engine.update_weights(bad.items(), peft_config=config)
    assert [n for n, _ in engine.transformer.named_modules()] == modules  # no adapter layers were injected
    assert engine.weight_version == 0
    assert_same_outputs(before, outputs(engine))
    good = random_lora(engine.transformer, config, seed=13)
    assert engine.update_weights(good.items(), peft_config=config) == 1


def test_full_weight_update_that_would_overflow_the_merged_lora_is_refused(fresh_engine):
    """The re-merge of the current LoRA into new base weights is checked before anything is written."""
    config = peft_config()
    lora = {k: (torch.full_like(v, 1e18) if ".transformer_blocks.0.attn.to_q." in k else torch.zeros_like(v))
            for k, v in random_lora(fresh_engine.transformer, config, 14).items()}
    fresh_engine.update_weights(lora.items(), peft_config=config)  # merged to_q = W + 2 * 4e36: finite
    before = {n: p.detach().clone() for n, p in fresh_engine.transformer.named_parameters()}
    params = {canonical_name(n): p.detach().clone() for n, p in fresh_engine.transformer.named_parameters()
              if "lora_" not in n}  # the base weights, by their plain names
    target = "transformer_blocks.0.attn.to_q.weight"
    params[target] = torch.full_like(params[target], 3.39e38)  # finite, but 3.39e38 + 8e36 overflows float32
    with pytest.raises(WeightUpdateError, match="overflows"):
        fresh_engine.update_weights(params.items())
    assert fresh_engine.weight_version == 1
    for n, p in fresh_engine.transformer.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize(
    "merge,dtype",
    [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)],
    ids=["merged-fp32", "unmerged-fp32", "merged-bf16"],
)
def test_synced_lora_samples_exactly_what_the_trainer_samples(tiny_model_path, merge, dtype):
    """One LoRA layer for both: a trainer's LoRA synced into a rollout gives its fixed-seed samples bit for bit."""
    from verl_diffusion_rollout.lora import MergedLoRALinear
    from verl_diffusion_rollout.trainer.policy import SharedPolicy

    trained = DiffusersEngine(tiny_model_path, dtype=dtype, lora=LoRASyncConfig(merge=merge))
    policy = SharedPolicy(trained.attach_trainer(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), merged=merge)
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for p in policy.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    policy.refresh()
    rollout = DiffusersEngine(tiny_model_path, dtype=dtype, lora=LoRASyncConfig(merge=merge))
    rollout.update_weights(policy.state_dict().items(), peft_config=policy.lora_config)
    layer = rollout.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, MergedLoRALinear) == merge
    assert layer.lora_A["default"].weight.dtype == torch.float32  # float32 factors, as the trainer's masters
    ours, theirs = outputs(rollout), outputs(trained)
    if merge and dtype == torch.float32:  # the LoRA does change the samples
        assert not torch.equal(ours["all_latents"], outputs(DiffusersEngine(tiny_model_path))["all_latents"])
    assert_same_outputs(ours, theirs)


def test_vllm_omni_version_check_accepts_the_verified_releases_and_names_others():
    """The in-memory LoRA patch runs on vllm-omni 0.26.x and 0.30.x (checked without vllm-omni installed)."""
    from verl_diffusion_rollout.engines.vllm_omni_lora import SUPPORTED_VLLM_OMNI_VERSIONS, check_vllm_omni_version

    assert SUPPORTED_VLLM_OMNI_VERSIONS == ("0.26.", "0.30.")
    for version in ("0.26.0", "0.26.3", "0.30.0", "0.30.1rc1"):
        check_vllm_omni_version(version)
    for version in ("0.27.0", "0.3.0", "0.260.0", "1.30.0", "unknown"):
        with pytest.raises(RuntimeError, match=rf"vllm-omni {re.escape(version)} is not a version .*0\.26\.x, 0\.30\.x"):
            check_vllm_omni_version(version)
