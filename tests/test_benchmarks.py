"""The benchmark harness still runs end to end on the CPU with the tiny model (no speed assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_rollout_bench_tiny_runs_and_reports(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "rollout_bench.py"), "--tiny", "--batch-sizes", "2",
        "--full-batches", "--core-variants", "diffusers,ours_nocapture,ours_sde_window,ours_opt",
        "--lora", "--numerics", "--steps", "4", "--out", str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (json_path,) = tmp_path.glob("*.json")
    results = json.loads(json_path.read_text())
    rows = results["rollout"]
    assert [r["variant"] for r in rows] == ["diffusers", "ours_nocapture", "ours_sde_window", "ours_opt"]
    assert all("error" not in r and r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    lora = results["lora"]
    assert lora["no_drift_after_syncs"] and lora["base_restored_exactly"] and lora["sync_ms_from_gpu_median"] > 0
    numerics = results["numerics"]
    assert numerics["ode_bit_exact_float32"] and numerics["ode_bit_exact_bfloat16"]
    assert numerics["pipeline_ode_bit_exact_float32"] and numerics["pipeline_ode_bit_exact_bfloat16"]
    assert all(v == 0.0 for k, v in numerics.items() if k.startswith("replay_max_abs_diff"))
    assert (tmp_path / json_path.name.replace(".json", ".md")).read_text().startswith("# Rollout benchmark")


def test_rollout_bench_tiny_sd3_runs_and_reports(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "rollout_bench.py"), "--tiny", "--family", "sd3", "--batch-sizes", "2",
        "--full-batches", "--core-variants", "diffusers,ours_nocapture,ours_sde_window,ours_opt",
        "--lora", "--numerics", "--steps", "4", "--out", str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (json_path,) = tmp_path.glob("*_sd3.json")
    results = json.loads(json_path.read_text())
    assert results["meta"]["family"] == "sd3" and "SD3.5" in results["meta"]["model"]
    rows = results["rollout"]
    assert [r["variant"] for r in rows] == ["diffusers", "ours_nocapture", "ours_sde_window", "ours_opt"]
    assert all("error" not in r and r["images_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    lora = results["lora"]
    assert lora["modules"] == 15  # joint attention only: 8 + 7 (text-pre-only last block), no attn2
    assert lora["no_drift_after_syncs"] and lora["base_restored_exactly"] and lora["sync_ms_from_gpu_median"] > 0
    numerics = results["numerics"]
    for dtype in ("float32", "bfloat16"):
        assert numerics[f"ode_bit_exact_{dtype}"] and numerics[f"pipeline_ode_bit_exact_{dtype}"]
    assert all(v == 0.0 for k, v in numerics.items() if k.startswith("replay_max_abs_diff"))
    assert (tmp_path / json_path.name.replace(".json", ".md")).read_text().startswith("# Rollout benchmark")


def test_step_bench_tiny_runs_the_recipe_and_reports(tmp_path):
    """The whole-step benchmark drives the recipe's own trainer (tiny Qwen-Image, CPU): two batch sizes on one
    loaded model and a second variant; every step replays exactly and the report has one row per step."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na photo of a dog on a car in the city with a tree\na blue bird\n")
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--tiny", "--samples", "16", "32", "--steps", "1",
        "--variants", "default,unmerged", "--out", str(tmp_path), "--work-dir", str(tmp_path / "runs"),
        "--prompts-file", str(prompts),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (json_path,) = tmp_path.glob("cpu_*_step_qwenimage.json")
    results = json.loads(json_path.read_text())
    assert results["meta"]["recipe"] == "flowgrpo_tiny" and results["meta"]["group_size"] == 8
    rows = results["rows"]
    assert [(r["variant"], r["samples"]) for r in rows] == [("default", 16), ("default", 32), ("unmerged", 16)]
    assert all("error" not in r for r in rows)
    assert all(r["logprob_max_abs_diff_pre_update"] == 0.0 for r in rows)
    assert [r["weight_version"] for r in rows] == [1, 2, 1]  # one loaded trainer per variant, one update per step
    assert all(r["step_s"] >= r["rollout_s"] + r["train_s"] - 1e-6 for r in rows)
    assert all(abs(r["images_per_s_per_worker"] - r["samples"] / r["step_s"]) < 1e-9 for r in rows)
    assert results["meta"]["prompts"] == str(prompts)
    # work per phase from the transformer's FLOPs (meta copy), and the fraction of the matrix rate
    assert all(f["forward"] > 0 and f["backward"] > 0 for f in results["flops_per_pass"].values())
    assert all(r["rollout_tflop"] > 0 and r["train_tflop"] > 0 and r["rollout_matrix_frac"] > 0 for r in rows)
    assert rows[1]["rollout_tflop"] == pytest.approx(2 * rows[0]["rollout_tflop"])  # twice the samples
    summary = {(e["variant"], e["samples"]): e for e in results["summary"]}
    assert set(summary) == {("default", 16), ("default", 32), ("unmerged", 16)}
    assert all(e["steady_steps_averaged"] == 0 and e["steady_step_s"] is None for e in summary.values())
    assert summary[("default", 16)]["first_step_s"] == rows[0]["step_s"]
    md = (tmp_path / json_path.name.replace(".json", ".md")).read_text()
    assert md.startswith("# Whole-step FlowGRPO benchmark") and md.count("| default |") == 4


def test_step_bench_steady_state_is_the_mean_after_the_warmup_steps():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_bench import summarize

    keys = ("rollout_s", "reward_s", "train_s", "switch_s", "images_per_s_per_worker", "rollout_matrix_frac",
            "train_matrix_frac")
    rows = [{"variant": "v", "samples": 8, "step_s": t, "logprob_max_abs_diff_pre_update": gap,
             "peak_gpu_gib": 1.0 + k, **{key: t / 2 for key in keys}}
            for k, (t, gap) in enumerate([(30.0, 0.0), (12.0, 1e-7), (10.0, 0.0), (14.0, 0.0)])]
    rows.append({"variant": "v", "samples": 16, "step_s": 5.0, "error": "out of memory"})
    (entry, oom) = summarize(rows, warmup=2)
    assert entry["steps"] == 4 and entry["steady_steps_averaged"] == 2
    assert entry["steady_step_s"] == 12.0 and entry["steady_train_s"] == 6.0 and entry["first_step_s"] == 30.0
    assert entry["first_over_steady"] == 2.5 and entry["logprob_gap_max"] == 1e-7 and entry["peak_gpu_gib_max"] == 4.0
    assert oom["steps"] == 0 and oom["error"] == "out of memory" and oom["steady_step_s"] is None


def test_step_bench_variant_names_compose_and_unknown_parts_are_named():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_bench import VARIANTS, variant_overrides

    assert variant_overrides("micro8+ckpt40") == VARIANTS["micro8"] + [
        "actor_rollout_ref.actor.gradient_checkpointing=true", "actor_rollout_ref.actor.checkpoint_blocks=40"]
    assert variant_overrides("default") == []
    assert variant_overrides("amb30") == ["actor_rollout_ref.actor.gradient_checkpointing=false",
                                          "actor_rollout_ref.actor.checkpoint_blocks=null",
                                          "actor_rollout_ref.actor.activation_memory_budget=0.3"]
    # the GPU recipes plan their checkpointing (auto): turning it off or recomputing every block says so
    assert "actor_rollout_ref.actor.checkpoint_blocks=null" in variant_overrides("no_ckpt")
    assert variant_overrides("ckpt_all") == ["actor_rollout_ref.actor.gradient_checkpointing=true",
                                             "actor_rollout_ref.actor.checkpoint_blocks=null"]
    assert "actor_rollout_ref.actor.checkpoint_blocks=auto" in variant_overrides("ckpt_auto")
    with pytest.raises(KeyError, match="'micro9'"):
        variant_overrides("micro8+micro9")
    with pytest.raises(KeyError, match=r"'amb150'.*amb<P> \(P in 0\.\.100\)"):
        variant_overrides("amb150")


def test_step_bench_resume_goes_on_from_the_last_checkpoint_in_the_next_command(tmp_path):
    """A run longer than one command (the GPU machine's 10-minute limit): with --resume each command starts from the
    variant's last checkpoint, so two commands of two steps are the run's steps 1-4, each replayed exactly."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--tiny", "--samples", "16", "--steps", "2",
           "--resume", "--work-dir", str(tmp_path / "runs")]
    steps, versions = [], []
    for k in range(2):
        out = subprocess.run([*cmd, "--out", str(tmp_path / f"out{k}")], capture_output=True, text=True, timeout=600,
                             cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        (json_path,) = (tmp_path / f"out{k}").glob("cpu_*_step_qwenimage.json")
        rows = json.loads(json_path.read_text())["rows"]
        assert all("error" not in r and r["logprob_max_abs_diff_pre_update"] == 0.0 for r in rows)
        assert all(r["save_s"] >= 0 for r in rows)
        steps += [r["rl_step"] for r in rows]
        versions += [r["weight_version"] for r in rows]
    assert steps == [1, 2, 3, 4]
    # a fresh engine per command: loading the checkpoint's LoRA is a weight version of its own, then one per update
    assert versions == [1, 2, 2, 3]
    md = (tmp_path / "out1" / json_path.name.replace(".json", ".md")).read_text()
    assert "| 1 (RL step 3) |" in md
    assert (tmp_path / "runs" / "default" / "checkpoints" / "step_000004").is_dir()


def test_step_bench_budget_stops_between_steps_with_complete_results(tmp_path):
    """Under a command time limit the bench starts no step it cannot finish: a budget shorter than two steps ends the
    run after the first, results written and the stop recorded, not a kill in the middle of a step."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--tiny", "--samples", "16", "--steps", "3",
           "--variants", "default,micro8", "--out", str(tmp_path), "--work-dir", str(tmp_path / "runs")]
    out = subprocess.run([*cmd, "--budget-s", "0.001"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (json_path,) = tmp_path.glob("cpu_*_step_qwenimage.json")
    results = json.loads(json_path.read_text())
    assert [(r["variant"], r["step_in_phase"]) for r in results["rows"]] == [("default", 1)]
    assert "error" not in results["rows"][0]
    assert results["meta"]["stopped"].startswith("stopped by --budget-s 0.001")
    assert "(16 samples) would take about" in results["meta"]["stopped"]
    assert "**stopped by --budget-s" in json_path.with_suffix(".md").read_text()


def test_step_bench_profile_writes_the_in_trainer_rollout_top_ops(tmp_path):
    """``--profile``: one more step per variant with the actor's rollout under torch.profiler; its top-ops table is
    written beside the results and summarised in them (the bug this pins: ``--profile`` once named a function that
    did not exist, and only a GPU run would have found it)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--tiny", "--samples", "16", "--steps", "1",
           "--variants", "default", "--profile", "--profile-rows", "12", "--out", str(tmp_path),
           "--work-dir", str(tmp_path / "runs")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (json_path,) = tmp_path.glob("cpu_*_step_qwenimage.json")
    results = json.loads(json_path.read_text())
    profile = results["profiles"]["default"]
    table = (tmp_path / profile["file"]).read_text()
    assert table.startswith("in-trainer rollout of variant default") and "Self CPU" in table
    assert profile["wall_s"] > 0 and profile["device_busy_frac"] is None  # no device on the CPU
    assert 1 <= len(profile["top"]) <= 10 and all(t["self_ms"] >= 0 and t["calls"] >= 1 for t in profile["top"])
    assert [r["step_in_phase"] for r in results["rows"]] == [1]  # the profiled step is not a timed row
    assert profile["file"] in json_path.with_suffix(".md").read_text()


def test_kernel_breakdown_counts_kernel_rows_once_by_kind():
    """``kernel_breakdown`` on a profile table the H200 wrote: only kernel rows (no host time) count, so the ops that
    launch kernels (``aten::addmm``) and host markers (``Command Buffer Full``) do not count their time twice; the
    kinds and the rest below the table add up to torch's own device total."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_breakdown as kb

    table = (ROOT / "benchmarks" / "results" / "H200_2026-12-03_step_qwenimage_profile_profile_default.txt").read_text()
    kernels, total_us = kb.parse_table(table)
    names = [name for name, _ in kernels]
    assert total_us == pytest.approx(11.659e6)
    assert "aten::addmm" not in names and "Command Buffer Full" not in names and "cudaStreamIsCapturing" not in names
    assert ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", pytest.approx(4.659e6)) in kernels
    rows = kb.breakdown(kernels, total_us)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["ms"] for r in rows) == pytest.approx(total_us / 1e3)
    assert rows[0]["kind"] == "matrix multiply" and rows[-1]["kind"] == "below the table"
    kinds = {r["kind"]: r for r in rows}
    # the Triton kernels inductor fuses around attention carry its name but are not attention
    assert kinds["attention"]["kernels"] == 1
    fused_near_attention = "triton_poi_fused__scaled_dot_product_cudnn_attention_3"
    assert kb.kernel_kind(fused_near_attention) == "other fused elementwise (Triton)"
    assert kb.kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc") == "convolution (VAE)"
    assert kb.kernel_kind("some_new_kernel") == "other kernels"
    assert "| matrix multiply | 7983.2 | 68.5% | 4 |" in kb.markdown(rows)


def test_kernel_breakdown_refuses_what_it_cannot_read():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_breakdown as kb

    with pytest.raises(ValueError, match="Self CUDA"):
        kb.parse_table("Name  Self CPU %  Self CPU  CPU total %  CPU total  CPU time avg  # of Calls\n")
    with pytest.raises(ValueError, match="total_us 1.0 is below the listed kernels' 5.0 us"):
        kb.breakdown([("nvjet_a", 5.0)], total_us=1.0)
    assert kb.breakdown([("nvjet_a", 3.0), ("triton_poi_fused_gelu_1", 1.0)]) == [
        {"kind": "matrix multiply", "ms": 0.003, "share": 0.75, "kernels": 1},
        {"kind": "GELU (Triton)", "ms": 0.001, "share": 0.25, "kernels": 1},
    ]


def test_step_bench_verl_omni_preset_runs_with_the_colocated_vlm_reward(tmp_path):
    """``--preset verl_omni`` on the tiny model (at 64px, by ``--override``, to keep CI short): verl-omni's LoRA (r64
    on twelve projections), 16 per prompt, its SDE window, half the step's prompts per optimizer step and the
    colocated VLM reward scoring every image; the step replays exactly. The GPU run of the preset goes this path."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_bench.py"), "--tiny", "--preset", "verl_omni",
           "--prompts-per-step", "2", "--steps", "1", "--out", str(tmp_path), "--work-dir", str(tmp_path / "runs"),
           "--override", "actor_rollout_ref.rollout.sampling.height=64", "actor_rollout_ref.rollout.sampling.width=64"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (json_path,) = tmp_path.glob("cpu_*_step_qwenimage_verl_omni.json")
    results = json.loads(json_path.read_text())
    meta = results["meta"]
    assert meta["preset"] == "verl_omni" and meta["group_size"] == 16
    assert meta["lora_rank"] == 64 and meta["lora_targets"] == 12
    assert "img_mlp.net.0.proj" in meta["lora_target_modules"] and "txt_mlp.net.2" in meta["lora_target_modules"]
    assert meta["reward"].startswith("vlm_ocr: a colocated tiny Qwen3-VL")
    (row,) = results["rows"]
    assert row["samples"] == 32 and "error" not in row
    assert row["logprob_max_abs_diff_pre_update"] == 0.0
    assert row["reward_s"] > 0  # the VLM scored the images inside the timed step
