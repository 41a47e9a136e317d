"""Multi-device FlowGRPO on verl's single-controller machinery: one :class:`FlowGRPOWorker` per device.

The driver builds a verl ``RayResourcePool`` (``trainer.n_gpus_per_node`` processes on each of ``trainer.nnodes``
nodes) and a ``RayWorkerGroup`` of this class; verl starts one Ray actor per bundle and hands each its rank, the
world size and the rendezvous address. Each worker owns a :class:`~verl_diffusion_rollout.trainer.actor.FlowGRPOActor`
on its device and joins a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs) used for one thing:
summing the float64 gradient accumulators before every optimizer step, so every worker steps with the same
gradients and keeps bit-identical LoRA weights.

With ``actor_rollout_ref.actor.ulysses_sequence_parallel_size = S > 1`` the workers also build verl's
``("dp", "sp")`` device mesh: the ``S`` ranks of an ``sp`` group share every transformer forward (Ulysses sequence
parallelism) and sample and train the same samples. The gradient sum stays over all workers, so it adds up every
group's token shards and every data-parallel group's samples.

Methods are registered with verl's dispatch modes: :func:`~.dispatch.per_dp_group` takes one argument per
data-parallel group (the driver's requests), ``ONE_TO_ALL`` broadcasts, ``RANK_ZERO`` runs on rank 0 only.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, Execute, register

from .actor import FlowGRPOActor, GenerateResult, MiniBatchPlan, UpdateResult
from .config import FlowGRPOConfig
from .dispatch import MESH, per_dp_group

__all__ = ["FlowGRPOWorker"]


class FlowGRPOWorker(Worker):
    """A verl worker holding one device's rollout engine and the policy trained in it."""

    def __init__(self, config: FlowGRPOConfig, cpu_threads: int | None = None):
        super().__init__()
        self.config = config
        self.cpu_threads = cpu_threads
        self.actor: FlowGRPOActor | None = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> dict[str, Any]:
        """Join the process group and build the actor; returns where it landed.

        The GPU is the one verl's ``Worker`` assigned (``get_device_id()``: the only visible one when Ray sets
        ``CUDA_VISIBLE_DEVICES``, ``LOCAL_RANK`` under ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``). The process
        group times out after ``trainer.dist_timeout_s``, so a collective whose peer died fails instead of hanging.
        """
        from datetime import timedelta

        import torch.distributed as dist

        from ..compile_cache import use_compile_cache

        if self.config.trainer.resolved_compile_cache_dir:  # before the engine compiles its blocks
            use_compile_cache(self.config.trainer.resolved_compile_cache_dir)
        on_gpu = str(self.config.rollout.device or "").startswith("cuda") or (
            self.config.rollout.device is None and torch.cuda.is_available()
        )
        device_index = None
        if on_gpu:
            from verl.utils.device import get_device_id

            device_index = get_device_id()
            torch.cuda.set_device(device_index)  # this thread's current device: "cuda" now means it
        elif self.cpu_threads:
            # CPU kernels split their work by thread count, and so round differently: every worker uses the
            # driver's count, so results do not depend on how many workers share the samples.
            torch.set_num_threads(self.cpu_threads)
        if not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if on_gpu else "gloo",
                rank=self.rank,
                world_size=self.world_size,
                device_id=torch.device("cuda", device_index) if on_gpu else None,
                timeout=timedelta(seconds=self.config.trainer.dist_timeout_s),
            )
        sp = self.config.actor.ulysses_sequence_parallel_size
        mesh, dp_rank, leader = None, self.rank, True
        if sp > 1:  # verl's layout: groups of sp consecutive ranks; each group's first rank reports for it
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cuda" if on_gpu else "cpu", (self.world_size // sp, sp), mesh_dim_names=("dp", "sp"))
            dp_rank, leader = mesh["dp"].get_local_rank(), mesh["sp"].get_local_rank() == 0
        self._register_dispatch_collect_info(MESH, dp_rank=dp_rank, is_collect=leader)
        self.actor = FlowGRPOActor(self.config, all_reduce=self._all_reduce, device_mesh=mesh)
        return {
            "rank": self.rank,
            "dp_rank": dp_rank,
            "host": os.uname().nodename,
            "device": str(self.actor.device),
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        }

    @staticmethod
    def _all_reduce(tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    @register(dispatch_mode=per_dp_group(), blocking=False)
    def generate(self, request: dict[str, Any]) -> GenerateResult:
        return self.actor.generate(**request)

    @register(dispatch_mode=per_dp_group(), blocking=False)
    def evaluate(self, request: dict[str, Any]) -> GenerateResult:
        return self.actor.evaluate(**request)

    @register(dispatch_mode=per_dp_group(), blocking=False)
    def update(self, request: dict[str, Any]) -> UpdateResult:
        plan = [MiniBatchPlan(**p) for p in request["plan"]]
        return self.actor.update(request["advantages"], request["keep"], plan)

    @register(dispatch_mode=Dispatch.ALL_TO_ALL, execute_mode=Execute.RANK_ZERO)
    def state(self) -> dict[str, Any]:
        return self.actor.state()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_state(self, lora: dict[str, torch.Tensor], optimizer: dict[str, Any] | None, source: str) -> None:
        self.actor.load_state(lora, optimizer, source)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def checksum(self) -> str:
        return self.actor.checksum()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def close(self) -> None:
        import torch.distributed as dist

        if self.actor is not None:
            self.actor.close()
        if dist.is_initialized():
            dist.destroy_process_group()
