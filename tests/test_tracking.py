"""verl's Tracking as the run logger: the file backend's metrics.jsonl (resumed runs rewritten from their history),
wandb offline without an account, and trainer.logger validated against verl's backend names."""

from __future__ import annotations

import json
import os

import pytest

from verl_diffusion_rollout.trainer.config import RunConfig
from verl_diffusion_rollout.trainer.metrics import RunLogger


def test_file_backend_holds_the_resumed_history_then_new_steps(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 9, "data": {"stale": 1}}\n')  # a previous attempt's file
    history = [{"step": 1, "reward_mean": 0.5, "note": "text is not logged"}, {"step": 2, "reward_mean": 0.75}]
    before = dict(os.environ)
    logger = RunLogger(tmp_path, ["file"], "p", "e", history=history)
    assert dict(os.environ) == before  # the backends' paths were set only while Tracking was built
    logger.log(3, {"reward_mean": 1.0, "grad_norm": None, "flag": True})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [
        {"step": 1, "data": {"reward_mean": 0.5}},
        {"step": 2, "data": {"reward_mean": 0.75}},
        {"step": 3, "data": {"reward_mean": 1.0}},
    ]


def test_wandb_runs_offline_without_an_account(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the optional extra: pip install verl_diffusion_rollout[wandb]
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path, ["wandb"], "vdr-test", "offline", config={"trainer": {"total_steps": 1}})
    logger.log(1, {"reward_mean": 0.25})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "WANDB_MODE" not in os.environ


@pytest.mark.parametrize(
    "logger,match",
    [
        (["console", "jsonl"], r"unknown trainer.logger entries \['jsonl'\] \('jsonl' is now verl's 'file' backend\)"),
        (["tensorbord"], r"unknown trainer.logger entries \['tensorbord'\]; verl's Tracking backends: .*'tensorboard'"),
        ({"a": 1}, "trainer.logger must be a list"),
    ],
)
def test_logger_names_are_verls_backends(logger, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(logger=logger)
    assert RunConfig(logger="wandb").logger == ["wandb"]


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("test_freq", -2, "trainer.test_freq must be an int >= -1, got -2"),
        ("val_before_train", "yes", "trainer.val_before_train must be true or false"),
        ("log_val_generations", 1.5, "trainer.log_val_generations must be an int >= 0"),
        ("experiment_name", "", "trainer.experiment_name must be a non-empty string"),
    ],
)
def test_evaluation_and_naming_keys_are_validated(key, value, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**{key: value})
