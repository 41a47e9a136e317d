"""verl_diffusion_rollout: a diffusion rollout backend for verl (FlowGRPO-style RL on flow-matching models)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="verl_diffusion_rollout",
    version="0.1.0",
    description="Diffusion rollout backend for verl: SDE/CPS log-prob sampling, in-memory LoRA sync, FlowGRPO recipe",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["verl_diffusion_rollout", "verl_diffusion_rollout.*"])
    + ["verl_diffusion_rollout.configs"],
    # The Hydra configs live at the top level (configs/) and ship inside the package, so that
    # `python -m verl_diffusion_rollout.main_flowgrpo --config-name ...` finds them after a plain pip install.
    package_dir={"verl_diffusion_rollout.configs": "configs"},
    package_data={"verl_diffusion_rollout.configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        # verl 0.9.x pins transformers < 5.11; diffusers 0.42 accepts that range.
        "verl>=0.9.0,<0.10",
        "torch>=2.6",
        "diffusers>=0.42,<0.43",
        "transformers>=4.57",
        "peft>=0.17",
        "safetensors>=0.4",
        "omegaconf>=2.3",
        "hydra-core>=1.3",
        "ray>=2.40",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "msgpack>=1.0",  # sglang-protocol answers (Accept: application/msgpack); ray depends on it too
        "pillow>=10",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "tqdm>=4.60",
        "numpy>=1.26",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3", "httpx>=0.27", "psutil>=5.9", "wandb>=0.17"],
        # trainer.logger=[..., wandb]: verl's Tracking logs to wandb (offline without an account: `wandb sync` later)
        "wandb": ["wandb>=0.17"],
        # vllm-omni pins transformers>=5.13 while verl 0.9 pins <5.11: install it in its own environment
        # (see README, "Choosing an engine").
        "vllm-omni": ["vllm==0.30.0", "vllm-omni==0.30.0"],
    },
    entry_points={
        # verl >= 0.9 imports every entry point of this group on `import verl`.
        "verl.plugins": ["diffusion = verl_diffusion_rollout.registration"],
    },
)
