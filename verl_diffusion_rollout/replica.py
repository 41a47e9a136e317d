"""``DiffusionReplica``: verl's ``RolloutReplica`` for diffusion, one engine per Ray actor.

``RolloutReplicaRegistry.get("diffusion")`` returns this class. In standalone mode each replica starts one
:class:`DiffusionServer` Ray actor (one GPU, or CPU only) that owns an engine and its HTTP rollout API;
``server_address`` is that API's ``host:port`` and ``server_handle`` the actor, whose methods mirror the API
(``generate``, ``update_weights``, ``sleep``, ``wake_up``). Scaling out is verl's and Ray's job: N replicas,
N actors, placed by Ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import ray
import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.rollout.replica import RolloutMode, RolloutReplica

from .config import DiffusionSamplingConfig
from .verl_config import DiffusionRolloutConfig
from .contract import RolloutBatch
from .rollout import _as_model_config, build_engine

__all__ = ["DiffusionReplica", "DiffusionServer", "auth_headers", "resolve_api_key"]

logger = logging.getLogger(__name__)


def resolve_api_key(config: DiffusionRolloutConfig) -> str | None:
    """``rollout.server_api_key``, else the ``VDR_API_KEY`` environment variable, else ``None``."""
    from .server import API_KEY_ENV

    return config.server_api_key or os.environ.get(API_KEY_ENV) or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    """HTTP headers a client of a rollout server sends (empty without a key)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class DiffusionServer:
    """A diffusion engine and its HTTP rollout server, meant to run as a Ray actor.

    ``api_key`` is passed explicitly (resolved by the replica on the driver), never read from the actor's config
    dump or environment, so the server and its clients agree on it.
    """

    def __init__(
        self, config: DiffusionRolloutConfig, model_path: str, replica_rank: int = 0, api_key: str | None = None
    ):
        from .server import check_bind, serve_in_thread

        check_bind(config.server_host, api_key, config.server_allow_unauthenticated)  # before loading the model
        self.config = config
        self.replica_rank = replica_rank
        self.engine = build_engine(config, model_path, replica_rank=replica_rank)
        self._http, self._address = serve_in_thread(
            self.engine,
            config.server_host,
            config.server_port,
            config.sampling,
            api_key=api_key,
            limits=config.server_limits,
            allow_unauthenticated=config.server_allow_unauthenticated,
        )

    def address(self) -> str:
        return self._address

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        sampling: dict[str, Any] | DiffusionSamplingConfig | None = None,
        n: int = 1,
        window_seed: int | None = None,
    ) -> RolloutBatch:
        if isinstance(sampling, dict):
            sampling = self.config.sampling.replace(**sampling)
        return self.engine.generate(prompts, seeds, sampling or self.config.sampling, n, window_seed)

    def update_weights(self, weights: list[tuple[str, torch.Tensor]], peft_config: Any = None) -> int:
        return self.engine.update_weights(weights, peft_config)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def sleep(self) -> None:
        self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    # verl's RolloutReplica also calls these on its servers; a diffusion engine has no KV cache or queue.
    def clear_kv_cache(self) -> None: ...
    def release_kv_cache(self) -> None: ...
    def resume_kv_cache(self) -> None: ...
    def abort_all_requests(self, reject_request: bool = False) -> None: ...
    def resume_generation(self) -> None: ...
    def start_profile(self, **kwargs: Any) -> None: ...
    def stop_profile(self) -> None: ...

    def shutdown(self) -> None:
        self._http.stop()
        self.engine.close()


def _wants_gpu(device: str | None) -> bool:
    if device is not None:
        return str(device).startswith("cuda")
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


class DiffusionReplica(RolloutReplica):
    """A rollout replica serving one diffusion engine from a Ray actor (standalone mode)."""

    def __init__(self, replica_rank: int, config: Any, model_config: Any, gpus_per_node: int = 8, **kwargs: Any):
        super().__init__(replica_rank, config, model_config, gpus_per_node=gpus_per_node, **kwargs)
        if not isinstance(self.config, DiffusionRolloutConfig):
            raise TypeError(f"DiffusionReplica needs a DiffusionRolloutConfig, got {type(self.config).__name__}")
        if self.world_size != 1:
            raise ValueError(
                f"a diffusion replica runs one engine on one device; got tensor x data x pipeline parallel = "
                f"{self.world_size}. Scale out with more replicas instead."
            )
        self.model_path = omega_conf_to_dataclass(_as_model_config(model_config)).local_path
        self._api_key = resolve_api_key(self.config)
        from .server import check_bind

        check_bind(self.config.server_host, self._api_key, self.config.server_allow_unauthenticated)

    @property
    def http_headers(self) -> dict[str, str]:
        """Headers for HTTP clients of this replica's ``server_address`` (the API key, when one is set)."""
        return auth_headers(self._api_key)

    def rollout_worker_use_gpu(self) -> bool:
        return _wants_gpu(self.config.device)

    async def init_standalone(self) -> None:
        """Start this replica's engine actor (verl's standalone mode: the rollout has its own devices)."""
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def init_hybrid(self, worker_group: Any) -> None:
        raise NotImplementedError(
            "hybrid mode (rollout inside the trainer's workers) uses DiffusionRollout in-process through "
            "get_rollout_class('diffusion'); DiffusionReplica serves standalone engines"
        )

    async def init_hybrid_colocated(self, worker_group: Any, resource_pool: Any) -> None:
        await self.init_hybrid(worker_group)

    async def init_colocated(self, resource_pool: Any) -> None:
        await self.init_hybrid(None)

    async def launch_servers(self) -> None:
        num_gpus = 1 if self.rollout_worker_use_gpu() else 0
        name = f"diffusion_server_{self.replica_rank}{self.name_suffix}"
        actor_cls = ray.remote(DiffusionServer)
        server = actor_cls.options(name=name, num_cpus=1, num_gpus=num_gpus, max_concurrency=16).remote(
            self.config, self.model_path, self.replica_rank, self._api_key
        )
        self._server_address = await server.address.remote()
        self._server_handle = server
        self.servers = [server]
        logger.info("diffusion replica %d serving at %s", self.replica_rank, self._server_address)

    async def generate(self, prompts: Sequence[str], **kwargs: Any) -> RolloutBatch:
        """Generate through the actor (same arguments as ``DiffusionEngine.generate``)."""
        return await self._server_handle.generate.remote(list(prompts), **kwargs)

    async def update_weights(self, weights: Sequence[tuple[str, torch.Tensor]], peft_config: Any = None) -> int:
        return await self._server_handle.update_weights.remote(list(weights), peft_config)

    async def shutdown(self) -> None:
        for server in self.servers:
            try:
                await server.shutdown.remote()
            finally:
                ray.kill(server)
        self.servers = []
