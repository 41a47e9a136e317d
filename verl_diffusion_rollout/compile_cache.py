"""Pay ``torch.compile``'s cost once: point inductor's on-disk caches at a folder that outlives the process.

A fresh process re-traces the transformer blocks with dynamo (seconds), but the expensive part, inductor's code
generation and Triton's kernel compilation and autotuning, is looked up in the caches instead of redone:

* the FX graph cache (``TORCHINDUCTOR_FX_GRAPH_CACHE``): compiled inductor graphs keyed by the graph, its inputs'
  shapes/dtypes/strides, the torch version and the inductor config;
* the AOT autograd cache (``TORCHINDUCTOR_AUTOGRAD_CACHE``): the joint forward/backward graphs of training
  (the update's autograd forwards and the rollout's autograd-mode stochastic steps);
* Triton's kernel cache (``TRITON_CACHE_DIR``).

A hit returns the same compiled code as the miss produced, so outputs are unchanged. The FlowGRPO recipe calls
:func:`use_compile_cache` with ``trainer.compile_cache_dir`` (default ``<trainer.output_dir>/compile_cache``)
before anything is compiled. Imports only torch: usable from any layer.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["use_compile_cache", "compile_cache_stats"]


def use_compile_cache(path: str | os.PathLike) -> Path:
    """Make this process (and the processes it starts later, e.g. Ray workers) cache compiled code under ``path``.

    Sets ``TORCHINDUCTOR_CACHE_DIR=path``, ``TRITON_CACHE_DIR=path/triton``, turns the FX graph and AOT autograd
    caches on (environment and, when already imported, the live inductor/functorch configs) and creates the folder.
    Call it before the first ``torch.compile`` runs; graphs compiled earlier in this process are not moved.

    Returns:
        The absolute cache folder.

    Raises:
        ValueError: ``path`` is empty or names an existing file.
    """
    if not str(path):
        raise ValueError("compile cache dir must be a non-empty path")
    folder = Path(path).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"compile cache dir {str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "triton").mkdir(exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def compile_cache_stats() -> dict[str, int]:
    """This process's cache counters so far: inductor FX graph cache hits/misses and AOT autograd cache
    hits/misses (``torch._dynamo.utils.counters``)."""
    from torch._dynamo.utils import counters

    return {
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "autograd_cache_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "autograd_cache_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }
