"""How the driver's per-data-parallel-group requests reach the workers: verl's N-D dispatch over a ``("dp", "sp")``
mesh.

With ``actor_rollout_ref.actor.ulysses_sequence_parallel_size = S`` the ``W`` workers form ``W / S`` data-parallel
groups of ``S`` consecutive ranks (verl's layout: ``init_device_mesh(..., (W / S, S), ("dp", "sp"))``). Each worker
registers its data-parallel rank and whether it reports for its group (sequence-parallel rank 0) with verl's
``Worker._register_dispatch_collect_info``; a method registered with :func:`per_dp_group` then takes one request per
data-parallel group, and verl's ``dispatch_nd_compute`` hands request ``d`` to every worker of group ``d``. The
driver waits for every worker (a failure anywhere is seen) and keeps the group leaders' results
(:func:`dp_leaders`, verl's ``collect_nd_compute``). With ``S = 1`` every worker is its own group and leader.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from verl.single_controller.base.decorator import collect_all_to_all, collect_nd_compute, dispatch_nd_compute

__all__ = ["MESH", "per_dp_group", "dp_leaders"]

MESH = "actor"  # the mesh name the workers register under


def _dispatch(mesh_name: str, worker_group: Any, *args: Any, **kwargs: Any):
    if mesh_name not in worker_group._dispatch_info:
        worker_group._dispatch_info[mesh_name] = worker_group._query_dispatch_info(mesh_name)
    mapping = worker_group._dispatch_info[mesh_name]
    return dispatch_nd_compute(mapping, max(mapping) + 1, worker_group, *args, **kwargs)


def per_dp_group(mesh_name: str = MESH) -> dict[str, Any]:
    """A verl ``register(dispatch_mode=...)`` value: one argument per data-parallel group, every worker's result."""
    return {"dispatch_fn": partial(_dispatch, mesh_name), "collect_fn": collect_all_to_all}


def dp_leaders(worker_group: Any, outputs: list, mesh_name: str = MESH) -> list:
    """The results of each data-parallel group's reporting worker, in group order, from one result per worker."""
    if mesh_name not in worker_group._collect_info:
        worker_group._collect_info[mesh_name] = worker_group._query_collect_info(mesh_name)
    return collect_nd_compute(worker_group._collect_info[mesh_name], worker_group, outputs)
