"""The compile cache (``trainer.compile_cache_dir``): a second process finds the first one's compiled code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from verl_diffusion_rollout.trainer.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]

# A small trained module compiled forward and backward (inductor's FX graph cache and the AOT autograd cache).
SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from verl_diffusion_rollout.compile_cache import compile_cache_stats, use_compile_cache

    use_compile_cache(sys.argv[1])
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    step = torch.compile(lambda x: net(x).square().mean())
    x = torch.randn(8, 16)
    loss = step(x)
    loss.backward()
    print(json.dumps({"loss": loss.item(), "grad": net[0].weight.grad.flatten().tolist(), **compile_cache_stats()}))
""")


def _run(cache: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": "/nonexistent/unused"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_hits_the_compile_cache_with_the_same_outputs(tmp_path):
    cache = tmp_path / "compile_cache"
    cold = _run(cache)
    assert cold["fxgraph_cache_miss"] > 0 and cold["fxgraph_cache_hit"] == 0
    assert cold["autograd_cache_miss"] > 0 and cold["autograd_cache_hit"] == 0
    assert any(cache.rglob("*")), "nothing was written to the cache folder"
    warm = _run(cache)
    assert warm["fxgraph_cache_hit"] > 0 and warm["fxgraph_cache_miss"] == 0
    assert warm["autograd_cache_hit"] > 0 and warm["autograd_cache_miss"] == 0
    assert warm["loss"] == cold["loss"] and warm["grad"] == cold["grad"]


def test_compile_cache_dir_defaults_under_output_dir_and_is_checked(tmp_path):
    assert RunConfig(output_dir=str(tmp_path)).resolved_compile_cache_dir == str(tmp_path / "compile_cache")
    assert RunConfig(output_dir=str(tmp_path), compile_cache_dir="/x/y").resolved_compile_cache_dir == "/x/y"
    assert RunConfig(output_dir=str(tmp_path), compile_cache_dir="").resolved_compile_cache_dir is None
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="trainer.compile_cache_dir .*a_file.* not a folder"):
        RunConfig(output_dir=str(tmp_path), compile_cache_dir=str(blocker))
    with pytest.raises(ValueError, match="trainer.compile_cache_dir must be a path"):
        RunConfig(output_dir=str(tmp_path), compile_cache_dir=3)
