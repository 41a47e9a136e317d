"""``actor.checkpoint_blocks: auto``: the plan's arithmetic, its measurement, and that whatever count it picks the
forward recomputes exactly those blocks and the gradients stay bit for bit those without checkpointing.

A CPU has no allocator statistics, so these tests hand the plan a stand-in for ``torch.cuda.memory_allocated``
(labelled where used); ``tests/test_gpu.py`` runs the same plan on the CUDA allocator.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from verl_diffusion_rollout.trainer.block_checkpointing import MemoryPlan, tensor_bytes
from verl_diffusion_rollout.trainer.policy import SharedPolicy

from test_shared_policy import TARGETS, _block_calls_and_grads, tiny_transformer

GIB = 2**30


def test_tensor_bytes_walks_nested_arguments():
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert tensor_bytes((x, [x.float(), None], {"a": x}, 3.0)) == 12 + 24 + 12


@pytest.mark.parametrize(
    "allocated, target, expected",
    [
        # room = 100 - 40 - 10 x 1 = 50 GiB; 50 / 4 = 12 blocks, less 2 (the backward's recompute) = 10 kept of 10
        (40, 100, 0),
        # room = 70 - 40 - 10 = 20: 5 - 2 = 3 kept, 7 recomputed
        (40, 70, 7),
        # room below the 2 blocks of the backward: every block recomputed
        (40, 55, 10),
        (40, 30, 10),
    ],
)
def test_memory_plan_keeps_as_many_blocks_as_fit(allocated, target, expected):
    # stand-in for torch.cuda.memory_allocated (a CPU has no allocator statistics): a fixed reading
    plan = MemoryPlan(num_blocks=10, memory_fraction=1.0, allocated=lambda: allocated * GIB,
                      reachable=lambda: target * GIB, activations_per_input_byte=4.0)
    inputs = (torch.empty(GIB // 2, dtype=torch.uint8), torch.empty(GIB // 2, dtype=torch.uint8))  # 1 GiB of inputs
    assert plan.recompute_count(inputs) == expected


def test_memory_plan_measures_one_run_of_the_first_block():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    args = (torch.randn(4, 16),)
    out_bytes = tensor_bytes(block(*args))
    calls.clear()
    # stand-in for torch.cuda.memory_allocated: the readings before and after the block's run, then the last one
    readings = [10_000, 10_000 + 3 * tensor_bytes(args) + out_bytes]
    plan = MemoryPlan(num_blocks=2, memory_fraction=1.0,
                      allocated=lambda: readings.pop(0) if len(readings) > 1 else readings[0], reachable=lambda: GIB)
    plan.measure(block, args)
    assert calls == [1]  # one extra run, its output dropped
    assert plan.activations_per_input_byte == pytest.approx(3.0)
    assert plan.measured


def _first_block_input_bytes(family) -> int:
    """Bytes of the first block's arguments in the tiny forward, as the checkpointing function receives them."""
    seen = []

    class Recording(MemoryPlan):
        def recompute_count(self, args):
            seen.append(tensor_bytes(args))
            return self.num_blocks

    def record(policy):
        policy.checkpointing.plan = Recording(len(policy.checkpointing.blocks), 1.0, allocated=lambda: 0,
                                              reachable=lambda: 0)

    _block_calls_and_grads(family, prepare=record, gradient_checkpointing=True, checkpoint_blocks=0)
    return seen[0]


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_auto_recomputes_the_planned_blocks_with_the_gradients_of_no_checkpointing(family):
    plain_calls, plain_grads = _block_calls_and_grads(family)
    n = len(plain_calls)
    inputs = _first_block_input_bytes(family)
    for kept in (0, 1, n):
        # room for every block's inputs, the backward's 2 blocks and `kept` kept blocks of 1000 x their inputs
        target = n * inputs + (kept + 2) * 1000 * inputs
        plans = []

        def with_plan(policy, target=target):
            # stand-in for torch.cuda.memory_allocated (nothing else allocated); the activations per input byte
            # given rather than measured, which only a GPU's allocator can do
            policy.checkpointing.plan = MemoryPlan(n, 1.0, allocated=lambda: 0, reachable=lambda: target,
                                                   activations_per_input_byte=1000.0)
            plans.append(policy.checkpointing)

        calls, grads = _block_calls_and_grads(family, prepare=with_plan, gradient_checkpointing=True,
                                              checkpoint_blocks=0)
        recomputed = n - kept
        assert plans[0].counts == [recomputed], kept
        assert calls == [2] * recomputed + [1] * kept, kept
        assert sum(g is not None for g in grads) > len(grads) // 2
        for a, b in zip(grads, plain_grads):  # a recompute computes the same forward: the same gradients
            assert (a is None and b is None) or torch.equal(a, b), kept


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_the_first_forward_recomputes_every_block_and_measures_the_second(family):
    """Unmeasured, a plan recomputes everything (the safe choice) and runs the second block once more to measure
    it; the next forward plans from that measurement."""
    plans = []

    def with_plan(policy):
        n = len(policy.checkpointing.blocks)
        # stand-in for torch.cuda.memory_allocated: 0, then 1 GiB after the measured block's run, then 0 again
        readings = [0, GIB]
        policy.checkpointing.plan = MemoryPlan(n, 1.0, allocated=lambda: readings.pop(0) if readings else 0,
                                               reachable=lambda: 1000 * GIB)
        plans.append(policy.checkpointing)

    calls, _ = _block_calls_and_grads(family, prepare=with_plan, gradient_checkpointing=True, checkpoint_blocks=0)
    n = len(calls)
    checkpointing = plans[0]
    assert checkpointing.counts == [n]
    assert calls == [2, 3] + [2] * (n - 2)  # all recomputed, and the second block once more to measure it
    assert checkpointing.plan.measured and checkpointing.plan.activations_per_input_byte > 0
    assert checkpointing.plan.recompute_count((torch.zeros(4),)) == 0  # room for every block now


def test_a_reading_of_nothing_held_is_retried_then_every_block_stays_recomputed(caplog):
    block = torch.nn.Linear(8, 8)
    args = (torch.randn(2, 8),)
    # stand-in for torch.cuda.memory_allocated: a constant, as if the run's activations were matched by a free
    plan = MemoryPlan(num_blocks=4, memory_fraction=1.0, allocated=lambda: GIB, reachable=lambda: 1000 * GIB)
    for attempt in range(MemoryPlan.MAX_MEASUREMENTS):
        assert plan.wants_measurement, attempt
        plan.measure(block, args)
        assert not plan.measured and plan.recompute_count(args) == 4
    assert not plan.wants_measurement
    assert "read no activations; every block stays recomputed" in caplog.text


def test_no_room_recomputes_every_block_and_a_one_block_model_measures_its_block():
    # stand-in for torch.cuda.memory_allocated: more allocated than the target allows
    full = MemoryPlan(3, 0.5, allocated=lambda: 10 * GIB, reachable=lambda: 12 * GIB, activations_per_input_byte=1.0)
    assert full.recompute_count((torch.zeros(4),)) == 3
    assert MemoryPlan(1, 1.0, allocated=lambda: 0, reachable=lambda: GIB).measure_index == 0
    assert MemoryPlan(5, 1.0, allocated=lambda: 0, reachable=lambda: GIB).measure_index == 1


def test_a_longer_forward_recomputes_more_blocks():
    n = 10
    # stand-in for torch.cuda.memory_allocated: a fixed 1 GiB in use
    plan = MemoryPlan(n, 1.0, allocated=lambda: GIB, reachable=lambda: 20 * GIB, activations_per_input_byte=8.0)
    short, long = (torch.empty(GIB // 8, dtype=torch.uint8),), (torch.empty(GIB // 4, dtype=torch.uint8),)
    assert plan.recompute_count(short) < plan.recompute_count(long)


def test_auto_without_blocks_is_refused_naming_the_key():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"checkpoint_blocks=auto plans transformer_blocks; Sequential has none"):
        SharedPolicy(model, LoraConfig(r=2, target_modules=["0"]), gradient_checkpointing=True,
                     checkpoint_blocks="auto")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_auto_on_a_cpu_policy_is_refused_before_the_adapter():
    transformer = tiny_transformer()
    with pytest.raises(ValueError, match=r"checkpoint_blocks=auto reads the CUDA allocator; the policy is on cpu"):
        SharedPolicy(transformer, LoraConfig(r=4, target_modules=TARGETS), gradient_checkpointing=True,
                     checkpoint_blocks="auto")
    assert not any("lora" in name for name, _ in transformer.named_parameters())
    assert not transformer.gradient_checkpointing

