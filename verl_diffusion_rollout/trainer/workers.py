"""The driver's handle on its workers: one in this process, or a verl ``RayWorkerGroup`` of them.

Both expose the same calls, ``generate``, ``evaluate`` and ``update`` taking one request per data-parallel group and returning
one result per group (its sequence-parallel rank 0's), and ``state`` (rank 0), ``load_state``, ``checksums`` (one
per worker), ``close``. A worker that dies raises :class:`WorkerFailed` naming its rank and what it was doing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .actor import FlowGRPOActor, GenerateResult, MiniBatchPlan, UpdateResult
from .config import FlowGRPOConfig
from .dispatch import dp_leaders

__all__ = ["WorkerFailed", "LocalWorkers", "RayWorkers", "make_workers"]

logger = logging.getLogger(__name__)


class WorkerFailed(RuntimeError):
    """A worker died or raised; ``rank`` and ``phase`` say which and when."""

    def __init__(self, rank: int, phase: str, cause: BaseException):
        super().__init__(f"worker {rank} failed during {phase}: {type(cause).__name__}: {str(cause)[:2000]}")
        self.rank, self.phase, self.cause = rank, phase, cause


class LocalWorkers:
    """``trainer.nnodes * trainer.n_gpus_per_node == 1``: the one worker is an actor in this process (no Ray)."""

    world_size = 1
    rolls_back_interrupted_update = True  # an interrupt inside the update restores the state before it (same process)

    def __init__(self, config: FlowGRPOConfig):
        self.actor = FlowGRPOActor(config)
        self.placements = [{"rank": 0, "device": str(self.actor.device)}]

    def generate(self, requests: list[dict[str, Any]]) -> list[GenerateResult]:
        return [self.actor.generate(**requests[0])]

    def evaluate(self, requests: list[dict[str, Any]]) -> list[GenerateResult]:
        return [self.actor.evaluate(**requests[0])]

    def update(self, requests: list[dict[str, Any]]) -> list[UpdateResult]:
        request = requests[0]
        plan = [MiniBatchPlan(**p) for p in request["plan"]]
        return [self.actor.update(request["advantages"], request["keep"], plan)]

    def state(self) -> dict[str, Any]:
        return self.actor.state()

    def load_state(self, lora: dict[str, torch.Tensor], optimizer: dict[str, Any] | None, source: str) -> None:
        self.actor.load_state(lora, optimizer, source)

    def checksums(self) -> list[str]:
        return [self.actor.checksum()]

    def close(self) -> None:
        self.actor.close()


class RayWorkers:
    """``trainer.nnodes x trainer.n_gpus_per_node`` :class:`~.worker.FlowGRPOWorker` actors in a verl
    ``RayWorkerGroup`` over a verl ``RayResourcePool`` (one bundle, and one process, per device).

    Joins the Ray cluster at ``trainer.ray_address`` (or ``RAY_ADDRESS``) when given, else starts a local one.
    Results are awaited with ``ray.wait`` in completion order, so the first worker to fail is the one named, even
    while the others are blocked in a collective with it.
    """

    rolls_back_interrupted_update = False  # the workers run on: an abandoned update may still complete

    def __init__(self, config: FlowGRPOConfig):
        import ray
        from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

        from .worker import FlowGRPOWorker

        trainer = config.trainer
        if not ray.is_initialized():
            ray.init(address=trainer.ray_address, log_to_driver=True)
        device = config.rollout.device
        use_gpu = str(device).startswith("cuda") if device is not None else bool(ray.cluster_resources().get("GPU"))
        self.world_size = trainer.world_size
        pool = RayResourcePool(
            process_on_nodes=[trainer.n_gpus_per_node] * trainer.nnodes,
            use_gpu=use_gpu,
            max_colocate_count=1,
        )
        self.pool = pool
        self.failed = False  # after a failure the others may be stuck in a collective: close kills, never waits
        # CPU workers compute with the driver's intra-op thread count (see FlowGRPOWorker.init_model).
        worker_cls = RayClassWithInitArgs(cls=ray.remote(FlowGRPOWorker), config=config,
                                          cpu_threads=None if use_gpu else torch.get_num_threads())
        self.group = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=worker_cls,
                                    device_name="cuda" if use_gpu else "cpu")
        self.placements = self._call("init_model", self.group.execute_all_async("init_model"))
        logger.info("FlowGRPO workers: %s", self.placements)

    def _call(self, phase: str, refs: list) -> list:
        """One result per worker, in rank order; the first to fail (in time) raises :class:`WorkerFailed`."""
        import ray

        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except Exception as err:  # the actor died (RayActorError), or its method raised (RayTaskError)
                    self.failed = True
                    raise WorkerFailed(rank, phase, err) from err
        return [results[rank] for rank in range(len(refs))]

    def generate(self, requests: list[dict[str, Any]]) -> list[GenerateResult]:
        return dp_leaders(self.group, self._call("generate", self.group.generate(requests)))

    def evaluate(self, requests: list[dict[str, Any]]) -> list[GenerateResult]:
        return dp_leaders(self.group, self._call("evaluate", self.group.evaluate(requests)))

    def update(self, requests: list[dict[str, Any]]) -> list[UpdateResult]:
        return dp_leaders(self.group, self._call("update", self.group.update(requests)))

    def state(self) -> dict[str, Any]:
        return self._call("state", [self.group.execute_rank_zero_async("state")])[0]

    def load_state(self, lora: dict[str, torch.Tensor], optimizer: dict[str, Any] | None, source: str) -> None:
        import ray

        refs = [ray.put(lora), ray.put(optimizer)]
        self._call("load_state", self.group.execute_all_async("load_state", *refs, source))

    def checksums(self) -> list[str]:
        return self._call("checksum", self.group.execute_all_async("checksum"))

    def close(self) -> None:
        import ray

        if not self.failed:
            try:
                self._call("close", self.group.execute_all_async("close"))
            except WorkerFailed as err:
                logger.warning("closing the workers: %s", err)
        for worker in self.group.workers:
            ray.kill(worker)
        for pg in self.pool.pgs or []:
            ray.util.remove_placement_group(pg)


def make_workers(config: FlowGRPOConfig) -> LocalWorkers | RayWorkers:
    """One worker in this process for a world of 1, else a verl Ray worker group."""
    if config.trainer.world_size == 1:
        return LocalWorkers(config)
    return RayWorkers(config)
