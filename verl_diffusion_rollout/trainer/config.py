"""FlowGRPO recipe configuration: the Hydra tree ``actor_rollout_ref`` / ``data`` / ``algorithm`` / ``reward`` /
``trainer`` as dataclasses, validated before any work starts."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from ..config import attention_heads, check_heads
from ..verl_config import DiffusionModelConfig, DiffusionRolloutConfig
from .rewards import check_reward_config

__all__ = [
    "KL_CONVENTIONS", "LOGGER_BACKENDS", "ActorConfig", "DataConfig", "AlgorithmConfig", "RewardConfig", "RunConfig", "FlowGRPOConfig"
]

# verl's ``Tracking`` backends that ``trainer.logger`` may name (``verl.utils.tracking.Tracking.supported_backend``
# without the vendor-only ones).
LOGGER_BACKENDS: tuple[str, ...] = ("console", "file", "tensorboard", "wandb", "mlflow", "swanlab", "clearml", "trackio")

# How the KL to the reference is scaled (``actor.kl_convention``): FlowGRPO's term, or the exact transition KL.
KL_CONVENTIONS: tuple[str, ...] = ("flowgrpo", "exact")


def _build(cls, values: dict[str, Any] | None, prefix: str):
    values = dict(values or {})
    values.pop("_target_", None)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown keys {[prefix + k for k in unknown]}; known: {sorted(known)}")
    return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(key: str, value: Any, minimum: int) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is an int >= ``minimum`` (booleans are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum}, got {value!r}")


def _jsonl_prompt(line: str, path: str, number: int) -> str:
    """The ``prompt`` field of one ``.jsonl`` line; errors name the file and the line number."""
    import json

    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict) or "prompt" not in record:
        raise ValueError(f"{path}:{number}: a JSON object with a 'prompt' field is required")
    if not isinstance(record["prompt"], str) or not record["prompt"]:
        raise ValueError(f"{path}:{number}: 'prompt' must be a non-empty string, got {record['prompt']!r:.80}")
    return record["prompt"]


@dataclass
class ActorConfig:
    """``actor_rollout_ref.actor``: the policy update (FlowGRPO's defaults).

    The policy is the rollout's own transformer (one copy of the weights, on ``rollout.device`` in
    ``rollout.dtype``); its LoRA parameters train in float32.

    ``micro_batch_size`` is the forward batch of both the rollout and the update: the rollout samples a step in
    pieces of this many samples and the update replays exactly those pieces, so both run the transformer on
    identical tensors and the replayed log-probs equal the rollout's. It divides the group size (``rollout.n``) or
    is a multiple of it; ``None`` means one group. ``mini_batch_size`` (whole groups and whole forward batches) is the
    batch of one optimizer step.
    ``gradient_checkpointing`` recomputes the transformer blocks' activations in the backward pass instead of keeping
    them; ``checkpoint_blocks`` (with it) recomputes only the first N blocks and keeps the rest, a step between the
    two for a GPU with memory to spare (each kept block saves one block forward per replayed step; ``None``: all).
    ``checkpoint_blocks: auto`` (CUDA) chooses N at every forward: as few recomputed blocks as keep the forward and
    its backward within ``checkpoint_memory_fraction`` (default 0.85) of the memory the process can reach on the GPU,
    the activations per kept block measured once on the device; a GPU with room for all of them recomputes none.
    Refused with ``ulysses_sequence_parallel_size > 1`` (each worker would choose its own blocks).
    ``activation_memory_budget`` (with ``rollout.compile`` and without ``gradient_checkpointing``): the compiled
    blocks keep at most this fraction (0..1) of the activations they would keep for backward and recompute the
    rest, cheapest first (AOT autograd's partitioner, process-wide); ``None`` leaves torch's default (1).
    ``recompute_old_log_probs``: take the ratio's old log-probs from a replay before the update (verl's PPO does
    this) instead of the rollout's; they are equal here, so it only costs one forward per trained step.
    ``kl_convention`` (with ``kl_beta > 0``): ``flowgrpo`` is FlowGRPO's term, ``mean((mu - mu_ref)**2) /
    (2 * std_dev_t**2)`` with its ``std_dev_t`` (no ``sqrt(-dt)`` for ``sde``), so FlowGRPO's ``beta`` values mean
    what they mean there; ``exact`` divides by the transition variance ``(std_dev_t * sqrt(-dt))**2`` instead,
    the exact KL between the two step Gaussians, ``1 / (-dt)`` times FlowGRPO's for ``sde`` (equal for ``cps``).
    ``ulysses_sequence_parallel_size`` (verl's key; the rollout follows it): S workers share every transformer
    forward, each holding 1/S of the text and image tokens and H/S of the attention heads (Ulysses); it divides the
    worker count and the transformer's heads. The workers form ``world / S`` data-parallel groups of S.
    ``max_skipped_steps``: an update whose loss, gradient or updated LoRA is not finite is discarded (the weights and
    the optimizer stay as they were) and counted in ``skipped_steps``; this many in a row stop the run.
    """

    lr: float = 3e-4
    weight_decay: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    max_grad_norm: float = 1.0
    kl_beta: float = 0.0
    kl_convention: str = "flowgrpo"
    ppo_epochs: int = 1
    mini_batch_size: Optional[int] = None
    micro_batch_size: Optional[int] = None
    gradient_checkpointing: bool = False
    checkpoint_blocks: Optional[Union[int, str]] = None
    checkpoint_memory_fraction: Optional[float] = None
    activation_memory_budget: Optional[float] = None
    recompute_old_log_probs: bool = False
    ulysses_sequence_parallel_size: int = 1
    max_skipped_steps: int = 3

    def __post_init__(self) -> None:
        key = "actor_rollout_ref.actor."
        betas = self.adam_betas
        if (
            not isinstance(betas, (list, tuple))
            or len(betas) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"{key}adam_betas must be two numbers in [0, 1), got {betas!r}")
        self.adam_betas = tuple(float(b) for b in betas)
        for name in ("lr", "clip_range", "adv_clip_max", "max_grad_norm", "adam_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key}{name} must be > 0, got {value!r}")
        for name in ("weight_decay", "kl_beta"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{key}{name} must be >= 0, got {value!r}")
        if self.kl_convention not in KL_CONVENTIONS:
            raise ValueError(f"{key}kl_convention must be one of {list(KL_CONVENTIONS)}, got {self.kl_convention!r}")
        _check_int(f"{key}ppo_epochs", self.ppo_epochs, 1)
        _check_int(f"{key}ulysses_sequence_parallel_size", self.ulysses_sequence_parallel_size, 1)
        _check_int(f"{key}max_skipped_steps", self.max_skipped_steps, 1)
        for name in ("mini_batch_size", "micro_batch_size"):
            if getattr(self, name) is not None:
                _check_int(f"{key}{name}", getattr(self, name), 1)
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"{key}gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if self.checkpoint_blocks is not None:
            blocks = self.checkpoint_blocks
            if blocks != "auto" and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 0):
                raise ValueError(f"{key}checkpoint_blocks must be an int >= 0, auto or null, got {blocks!r}")
            if not self.gradient_checkpointing:
                raise ValueError(f"{key}checkpoint_blocks={self.checkpoint_blocks} needs "
                                 f"{key}gradient_checkpointing=true (without it no block is recomputed); to keep "
                                 f"every activation set {key}checkpoint_blocks=null as well")
        fraction = self.checkpoint_memory_fraction
        if fraction is not None:
            if not _is_number(fraction) or not 0 < fraction <= 1:
                raise ValueError(f"{key}checkpoint_memory_fraction must be a number in (0, 1] or null, got "
                                 f"{fraction!r}")
            if self.checkpoint_blocks != "auto":
                raise ValueError(f"{key}checkpoint_memory_fraction={fraction} bounds what {key}checkpoint_blocks=auto "
                                 f"keeps; checkpoint_blocks is {self.checkpoint_blocks!r}")
        budget = self.activation_memory_budget
        if budget is not None:
            if not _is_number(budget) or not 0 <= budget <= 1:
                raise ValueError(f"{key}activation_memory_budget must be a number in [0, 1] or null, got {budget!r}")
            if self.gradient_checkpointing:
                raise ValueError(f"{key}activation_memory_budget={budget} bounds what the compiled blocks keep for "
                                 f"backward; {key}gradient_checkpointing=true recomputes whole blocks instead: set "
                                 "one of the two")


@dataclass
class DataConfig:
    """``data``: where prompts come from and how many samples an RL step takes.

    ``val_prompts`` (inline) or ``val_files`` (a file, as ``train_files``): the held-out prompts of the evaluation
    (verl's ``data.val_files``); none means no evaluation.
    """

    prompts: Optional[list[str]] = None
    train_files: Optional[str] = None
    samples_per_step: int = 32
    val_prompts: Optional[list[str]] = None
    val_files: Optional[str] = None

    def __post_init__(self) -> None:
        _check_int("data.samples_per_step", self.samples_per_step, 1)

    def load_prompts(self) -> list[str]:
        """Inline ``prompts``, else ``train_files`` (``.txt``: one per line; ``.jsonl``: a ``prompt`` field)."""
        if self.prompts:
            prompts = [str(p) for p in self.prompts]
        elif self.train_files:
            prompts = _read_prompt_file(self.train_files, "data.train_files")
        else:
            raise ValueError("no prompts: set data.prompts (a list) or data.train_files (.txt or .jsonl)")
        if not prompts:
            raise ValueError("the prompt list is empty")
        return prompts

    def load_val_prompts(self) -> list[str]:
        """Inline ``val_prompts``, else ``val_files``; ``[]`` when neither is set (no evaluation)."""
        if self.val_prompts:
            return [str(p) for p in self.val_prompts]
        if self.val_files:
            prompts = _read_prompt_file(self.val_files, "data.val_files")
            if not prompts:
                raise ValueError(f"data.val_files {self.val_files!r} holds no prompts")
            return prompts
        return []


def _read_prompt_file(path: str, key: str) -> list[str]:
    """The prompts of a ``.txt`` (one per line) or ``.jsonl`` (a ``prompt`` field per line) file named by ``key``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key} {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [_jsonl_prompt(line, path, number) for number, line in enumerate(f, start=1) if line.strip()]
        return [line.strip() for line in f if line.strip()]


@dataclass
class AlgorithmConfig:
    """``algorithm``: advantage estimation."""

    global_std: bool = False
    adv_eps: float = 1e-4
    drop_equal_groups: bool = True


@dataclass
class RewardConfig:
    """``reward``: weighted reward functions and how they run.

    Each worker scores its own samples: every forward batch is scored in the background (``backend``: ``thread``,
    ``ray`` or ``sync``) while the next one is sampled.
    """

    functions: dict[str, float] = field(default_factory=lambda: {"jpeg_compressibility": 1.0})
    options: dict[str, dict] = field(default_factory=dict)
    backend: str = "thread"


@dataclass
class RunConfig:
    """``trainer``: length, placement, outputs, logging, checkpoints.

    ``nnodes`` x ``n_gpus_per_node`` workers (verl's words), one per device, each holding the rollout engine and
    the policy it trains; with 1 the step runs in this process and no Ray cluster is started. On a CPU machine
    (``actor_rollout_ref.rollout.device=cpu``) ``n_gpus_per_node`` counts CPU worker processes.
    ``ray_address``: an existing Ray cluster to join (also ``RAY_ADDRESS``); none starts a local one.
    ``check_weights_freq``: every that many steps the workers' LoRA checksums are compared (0: never).
    ``max_actor_ckpt_to_keep`` (verl's key): keep this many ``step_*`` checkpoints, the newest (null: all).
    ``dist_timeout_s``: the workers' process-group timeout (a collective whose peer died fails after it).
    ``logger``: verl's ``Tracking`` backends (:data:`LOGGER_BACKENDS`); ``file`` writes ``metrics.jsonl``,
    ``tensorboard`` writes ``tensorboard/`` in ``output_dir``; ``project_name`` / ``experiment_name`` name the run.
    Evaluation (with ``data.val_prompts`` / ``data.val_files``; verl's keys): every ``test_freq`` steps and at the
    last step (``test_freq <= 0``: never), and before the first step with ``val_before_train``; a grid of the first
    ``log_val_generations`` images each time.
    ``compile_cache_dir``: where ``torch.compile``'s inductor, AOT autograd and Triton caches live, so a restarted
    run (or the next run of the recipe) reuses the compiled code; ``None`` means ``<output_dir>/compile_cache``,
    an empty string leaves torch's own settings (``TORCHINDUCTOR_CACHE_DIR`` or its temp folder) alone.
    """

    total_steps: int = 20
    seed: int = 0
    output_dir: str = "outputs/flowgrpo"
    save_freq: int = 10
    plot_freq: int = 5
    resume_from: Optional[str] = None
    logger: list[str] = field(default_factory=lambda: ["console", "file", "tensorboard"])
    project_name: str = "verl_diffusion_rollout"
    experiment_name: str = "flowgrpo"
    progress_bar: bool = True
    nnodes: int = 1
    n_gpus_per_node: int = 1
    ray_address: Optional[str] = None
    check_weights_freq: int = 10
    max_actor_ckpt_to_keep: Optional[int] = None
    dist_timeout_s: int = 600
    test_freq: int = -1
    val_before_train: bool = True
    log_val_generations: int = 16
    compile_cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        _check_int("trainer.total_steps", self.total_steps, 1)
        _check_int("trainer.seed", self.seed, 0)
        _check_int("trainer.save_freq", self.save_freq, 0)  # 0: only the final / Ctrl-C checkpoints
        _check_int("trainer.plot_freq", self.plot_freq, 0)  # 0: never
        if isinstance(self.logger, str):
            self.logger = [self.logger]
        if not isinstance(self.logger, (list, tuple)):
            raise ValueError(f"trainer.logger must be a list of backend names, got {self.logger!r}")
        self.logger = [str(b) for b in self.logger]
        unknown = sorted(set(self.logger) - set(LOGGER_BACKENDS))
        if unknown:
            hint = " ('jsonl' is now verl's 'file' backend)" if "jsonl" in unknown else ""
            raise ValueError(f"unknown trainer.logger entries {unknown}{hint}; verl's Tracking backends: "
                             f"{list(LOGGER_BACKENDS)}")
        for name in ("project_name", "experiment_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"trainer.{name} must be a non-empty string, got {getattr(self, name)!r}")
        _check_int("trainer.nnodes", self.nnodes, 1)
        _check_int("trainer.n_gpus_per_node", self.n_gpus_per_node, 1)
        _check_int("trainer.check_weights_freq", self.check_weights_freq, 0)  # 0: never
        if self.max_actor_ckpt_to_keep is not None:
            _check_int("trainer.max_actor_ckpt_to_keep", self.max_actor_ckpt_to_keep, 1)
        _check_int("trainer.dist_timeout_s", self.dist_timeout_s, 1)
        _check_int("trainer.test_freq", self.test_freq, -1)  # -1 / 0: no periodic evaluation (verl: -1)
        _check_int("trainer.log_val_generations", self.log_val_generations, 0)
        if not isinstance(self.val_before_train, bool):
            raise ValueError(f"trainer.val_before_train must be true or false, got {self.val_before_train!r}")
        if self.compile_cache_dir is not None and not isinstance(self.compile_cache_dir, str):
            raise ValueError(f"trainer.compile_cache_dir must be a path, null or '', got {self.compile_cache_dir!r}")
        cache = self.resolved_compile_cache_dir
        if cache and os.path.exists(cache) and not os.path.isdir(cache):
            raise ValueError(f"trainer.compile_cache_dir {cache!r} exists and is not a folder")

    @property
    def resolved_compile_cache_dir(self) -> str | None:
        """The compile cache folder to use, or None to leave torch's settings alone."""
        if self.compile_cache_dir is None:
            return os.path.join(self.output_dir, "compile_cache")
        return self.compile_cache_dir or None

    @property
    def world_size(self) -> int:
        return self.nnodes * self.n_gpus_per_node


@dataclass
class FlowGRPOConfig:
    """The whole recipe, built from a Hydra config by :meth:`from_omegaconf`."""

    model: DiffusionModelConfig
    rollout: DiffusionRolloutConfig
    actor: ActorConfig
    data: DataConfig
    algorithm: AlgorithmConfig
    reward: RewardConfig
    trainer: RunConfig
    raw: Any = None

    @property
    def group_size(self) -> int:
        return self.rollout.n

    @property
    def prompts_per_step(self) -> int:
        return self.data.samples_per_step // self.rollout.n

    @property
    def dp_size(self) -> int:
        """Data-parallel groups: the workers over the sequence-parallel size."""
        return self.trainer.world_size // self.actor.ulysses_sequence_parallel_size

    @classmethod
    def from_omegaconf(cls, cfg: DictConfig) -> FlowGRPOConfig:
        """Validate and convert; every error names its key and fires before any model is loaded."""
        from verl.utils.config import omega_conf_to_dataclass

        try:
            model_path = cfg.actor_rollout_ref.model.path
        except MissingMandatoryValue:
            model_path = None
        if not model_path:
            raise ValueError(
                "actor_rollout_ref.model.path is required: a diffusers model folder, e.g. "
                "actor_rollout_ref.model.path=/models/Qwen-Image"
            )
        if not os.path.isdir(str(model_path)):
            raise FileNotFoundError(f"actor_rollout_ref.model.path {model_path!r} does not exist")

        def section(node: Any) -> dict[str, Any]:
            return OmegaConf.to_container(node, resolve=True) if node is not None else {}

        reward = _build(RewardConfig, section(cfg.get("reward")), "reward.")
        check_reward_config(reward.functions, reward.options)
        if reward.backend not in ("thread", "ray", "sync"):
            raise ValueError(f"reward.backend must be thread, ray or sync, got {reward.backend!r}")
        rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
        data = _build(DataConfig, section(cfg.get("data")), "data.")
        actor = _build(ActorConfig, section(cfg.actor_rollout_ref.get("actor")), "actor_rollout_ref.actor.")
        algorithm = _build(AlgorithmConfig, section(cfg.get("algorithm")), "algorithm.")
        trainer = _build(RunConfig, section(cfg.get("trainer")), "trainer.")
        n = rollout.n
        if n < 2:
            raise ValueError(f"GRPO needs a group of at least 2 samples per prompt: actor_rollout_ref.rollout.n={n}")
        if rollout.engine != "diffusers":
            raise ValueError(
                f"the FlowGRPO recipe trains the rollout engine's own transformer in place, which needs "
                f"actor_rollout_ref.rollout.engine=diffusers (got {rollout.engine!r}); to train with another engine, "
                "use the verl backend (DiffusionRollout.update_weights) from your own trainer"
            )
        samples = data.samples_per_step
        if samples < n or samples % n:
            raise ValueError(
                f"data.samples_per_step={samples} is not divisible by the group size actor_rollout_ref.rollout.n={n}"
            )
        micro = actor.micro_batch_size or n
        if n % micro and micro % n:
            raise ValueError(
                f"actor_rollout_ref.actor.micro_batch_size={micro} must divide the group size "
                f"actor_rollout_ref.rollout.n={n} or be a multiple of it (it is the rollout's and the update's "
                "forward batch, which holds whole groups or whole parts of one)"
            )
        unit = max(n, micro)  # what a worker is handed: one group, or one forward batch of whole groups
        if samples % unit:
            raise ValueError(
                f"data.samples_per_step={samples} must be a multiple of actor_rollout_ref.actor.micro_batch_size={micro}"
            )
        world, sp = trainer.world_size, actor.ulysses_sequence_parallel_size
        if world % sp:
            raise ValueError(
                f"trainer.nnodes x trainer.n_gpus_per_node = {world} workers do not split into sequence-parallel "
                f"groups of actor_rollout_ref.actor.ulysses_sequence_parallel_size={sp}"
            )
        if sp > 1:
            check_heads(sp, attention_heads(str(model_path)), "actor_rollout_ref.actor.ulysses_sequence_parallel_size")
        groups = world // sp
        if (samples // unit) % groups:
            where = f"{world} workers" if sp == 1 else f"{groups} data-parallel groups ({world} workers / {sp})"
            raise ValueError(
                f"data.samples_per_step={samples} makes {samples // unit} pieces of {unit} samples (whole groups of "
                f"{n}, whole forward batches of {micro}), which do not split evenly over "
                f"trainer.nnodes x trainer.n_gpus_per_node = {where}"
            )
        mini = actor.mini_batch_size or samples
        if mini % unit or samples % mini:
            raise ValueError(
                f"actor_rollout_ref.actor.mini_batch_size={mini} must be a multiple of {unit} (whole groups of "
                f"rollout.n={n} and whole forward batches of micro_batch_size={micro}) and divide "
                f"data.samples_per_step={samples}"
            )
        actor.micro_batch_size, actor.mini_batch_size = micro, mini
        if actor.checkpoint_blocks == "auto" and actor.ulysses_sequence_parallel_size > 1:
            raise ValueError(
                "actor_rollout_ref.actor.checkpoint_blocks=auto lets each worker choose its own recomputed blocks, but "
                f"with actor_rollout_ref.actor.ulysses_sequence_parallel_size={actor.ulysses_sequence_parallel_size} "
                "a block's all-to-alls must run on every worker of a group alike: set a number of blocks (or null)"
            )
        if actor.checkpoint_blocks == "auto" and rollout.device is not None and not str(rollout.device).startswith("cuda"):
            raise ValueError(
                "actor_rollout_ref.actor.checkpoint_blocks=auto plans from the CUDA allocator's memory; "
                f"actor_rollout_ref.rollout.device={rollout.device!r} has none (set a number of blocks instead)"
            )
        if actor.activation_memory_budget is not None and not rollout.compile:
            raise ValueError(
                f"actor_rollout_ref.actor.activation_memory_budget={actor.activation_memory_budget} sets how the "
                "compiled blocks split their training graphs; it needs actor_rollout_ref.rollout.compile=true"
            )
        data.load_prompts()  # fail now on a missing prompt file
        data.load_val_prompts()
        model = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
        if model.lora_rank <= 0:
            raise ValueError(f"actor_rollout_ref.model.lora_rank must be > 0 (FlowGRPO trains a LoRA), got {model.lora_rank}")
        return cls(model=model, rollout=rollout, actor=actor, data=data, algorithm=algorithm, reward=reward,
                   trainer=trainer, raw=cfg)
