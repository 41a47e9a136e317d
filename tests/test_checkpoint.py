"""Checkpoints without pickle: exact round trip of the trainer state, a resumed AdamW that steps identically, a
``latest`` marker that cannot leave its folder, errors that name the file, and LoRA key checks for resume."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from peft import LoraConfig

from verl_diffusion_rollout.trainer.checkpoint import (
    check_lora_keys,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

PEFT = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"])


def lora_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "blocks.0.to_q.lora_A.weight": torch.randn(2, 8, generator=g),
        "blocks.0.to_q.lora_B.weight": torch.randn(8, 2, generator=g).bfloat16(),
    }


def trained_optimizer(steps: int = 3):
    """A real AdamW over a few parameters after ``steps`` updates (per-param ``step`` tensors, moments)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        opt.step()
    return params, opt


def step_once(params, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def assert_equal_structure(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_equal_structure(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_structure(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


def test_trainer_state_round_trips_exactly_and_adamw_resumes_identically(tmp_path):
    params, opt = trained_optimizer()
    state = {
        "step": 3,
        "seed": 42,
        "history": [{"step": 1, "reward_mean": 0.25, "kl": None, "weight_version": 1},
                    {"step": 2, "reward_mean": float("nan"), "loss": float("-inf"), "weight_version": 2}],
        "optimizer": opt.state_dict(),
        "note": "plain JSON values",
        "rng": {"cpu": torch.get_rng_state(), "__weird_key": torch.ones(2, dtype=torch.bool)},
    }
    path = save_checkpoint(tmp_path / "checkpoints" / "step_000003", lora_state(), PEFT, state)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert not list((tmp_path / "checkpoints").rglob("*.pt"))
    lora, config, loaded = load_checkpoint(tmp_path / "checkpoints")  # via the latest marker
    assert_equal_structure(lora, lora_state())
    assert config["r"] == 2 and config["target_modules"] == ["to_q"]
    assert_equal_structure(state, loaded)
    assert isinstance(loaded["optimizer"]["state"][0]["step"], torch.Tensor)
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    # A fresh optimizer loads the state and steps exactly like the original.
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.AdamW(fresh_params, lr=1.0)
    fresh.load_state_dict(loaded["optimizer"])
    for i in range(3):
        step_once(params, opt, seed=i)
        step_once(fresh_params, fresh, seed=i)
    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q)
    assert latest_checkpoint(tmp_path / "checkpoints") == path


def test_a_pickle_is_never_loaded(tmp_path):
    """A checkpoint whose trainer state is the old pickle format, crafted to write a file when unpickled."""
    path = tmp_path / "checkpoints" / "step_000001"
    save_checkpoint(path, lora_state(), PEFT, {"step": 1})
    (path / "trainer_state.json").unlink()
    (path / "trainer_state.safetensors").unlink()
    victim = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(victim), "w"))

    (path / "trainer_state.pt").write_bytes(pickle.dumps({"step": Exploit()}))
    with pytest.raises(ValueError, match=r"trainer_state\.pt.*no longer read"):
        load_checkpoint(path)
    assert not victim.exists()


def test_latest_cannot_leave_the_checkpoint_folder(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(checkpoints / "step_000001", lora_state(), PEFT, {"step": 1})
    outside = tmp_path / "elsewhere"
    save_checkpoint(outside / "step_000009", lora_state(1), PEFT, {"step": 9})
    os.symlink(outside / "step_000009", checkpoints / "escape")
    for target in (str(outside / "step_000009"), "../elsewhere/step_000009", "..", "", "step_000001/../..", "escape"):
        (checkpoints / "latest").write_text(target)
        with pytest.raises(ValueError, match="latest"):
            latest_checkpoint(checkpoints)
        with pytest.raises(ValueError, match="latest"):
            load_checkpoint(checkpoints)
    (checkpoints / "latest").write_text("step_000001\n")
    assert latest_checkpoint(checkpoints) == str(checkpoints / "step_000001")
    (checkpoints / "latest").write_text("step_000404")
    assert latest_checkpoint(checkpoints) is None


@pytest.mark.parametrize("victim", ["pytorch_lora_weights.safetensors", "trainer_state.safetensors", "trainer_state.json"])
def test_corrupt_files_are_named(tmp_path, victim):
    path = tmp_path / "step_000001"
    save_checkpoint(path, lora_state(), PEFT, {"step": 1, "optimizer": {"state": {0: {"m": torch.ones(3)}}}})
    (path / victim).write_bytes(b"\x00garbage{")
    with pytest.raises(ValueError, match=victim.replace(".", r"\.")):
        load_checkpoint(path)
    (path / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim.replace(".", r"\.")):
        load_checkpoint(path)


def test_tampered_structure_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "step_000001"
    save_checkpoint(path, lora_state(), PEFT, {"step": 1, "m": torch.ones(2)})
    doc = json.loads((path / "trainer_state.json").read_text())
    doc["state"]["m"] = {"__tensor__": "t99"}
    (path / "trainer_state.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"trainer_state\.json.*t99"):
        load_checkpoint(path)
    doc["state"]["m"] = {"__reduce__": ["os.system", "true"]}
    (path / "trainer_state.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"trainer_state\.json.*unknown tagged value"):
        load_checkpoint(path)


def test_unsavable_values_fail_at_save_naming_where(tmp_path):
    with pytest.raises(TypeError, match=r"trainer_state\['history'\]\[0\]\['f'\].*function"):
        save_checkpoint(tmp_path / "c", lora_state(), PEFT, {"history": [{"f": print}]})


def test_check_lora_keys_names_missing_unexpected_and_mismatched():
    expected = {k: tuple(v.shape) for k, v in lora_state().items()}
    expected["blocks.1.to_q.lora_A.weight"] = (2, 8)
    check_lora_keys(expected, {**lora_state(), "blocks.1.to_q.lora_A.weight": torch.zeros(2, 8)}, "ckpt")
    loaded = {"blocks.0.to_q.lora_A.weight": torch.zeros(3, 8), "blocks.9.extra.lora_B.weight": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        check_lora_keys(expected, loaded, "/runs/x/step_000002")
    message = str(err.value)
    assert "/runs/x/step_000002" in message
    assert "2 missing" in message and "blocks.0.to_q.lora_B.weight" in message and "blocks.1.to_q.lora_A.weight" in message
    assert "1 unexpected" in message and "blocks.9.extra.lora_B.weight" in message
    assert "1 with the wrong shape" in message and "(3, 8) (expected (2, 8))" in message


def test_lora_is_saved_in_diffusers_layout_with_its_config(tmp_path):
    from safetensors import safe_open

    path = save_checkpoint(tmp_path / "step_000001", lora_state(), PEFT, {"step": 1}, pipeline_class="StableDiffusion3Pipeline")
    weights = os.path.join(path, "pytorch_lora_weights.safetensors")
    with safe_open(weights, framework="pt") as f:
        assert sorted(f.keys()) == sorted("transformer." + k for k in lora_state())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 2 and meta["transformer.lora_alpha"] == 4
    lora, config, _ = load_checkpoint(path)
    assert config["r"] == 2 and config["target_modules"] == ["to_q"]
    assert all(torch.equal(lora[k], v) and lora[k].dtype == v.dtype for k, v in lora_state().items())
    with pytest.raises(ValueError, match="NoSuchPipeline"):
        save_checkpoint(tmp_path / "bad", lora_state(), PEFT, {"step": 1}, pipeline_class="NoSuchPipeline")


def test_old_peft_layout_checkpoints_still_load_or_name_the_missing_file(tmp_path):
    """The layout written before diffusers' format: ``adapter_model.safetensors`` (peft prefix) + ``adapter_config.json``."""
    from safetensors.torch import save_file

    path = tmp_path / "step_000002"
    save_checkpoint(path, lora_state(), PEFT, {"step": 2, "m": torch.ones(2)})
    (path / "pytorch_lora_weights.safetensors").unlink()
    save_file({"base_model.model." + k: v for k, v in lora_state().items()}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["to_q"]}))
    lora, config, state = load_checkpoint(path)
    assert all(torch.equal(lora[k], v) for k, v in lora_state().items()) and sorted(lora) == sorted(lora_state())
    assert config["r"] == 2 and state["step"] == 2 and torch.equal(state["m"], torch.ones(2))
    (path / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_checkpoint(path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"pytorch_lora_weights\.safetensors"):
        load_checkpoint(path)
