"""verl_diffusion_rollout: a diffusion rollout backend for verl.

Importing the package registers the ``diffusion`` rollout with verl (see :mod:`.registration`); verl also
imports that module by itself through its ``verl.plugins`` entry point. The sampler core (``sde``,
``scheduler``, ``pipelines``, ``engines``, ``trainer.replay``) does not need verl; where verl is not installed
there is nothing to register into and the package imports without it.
"""

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("verl") is not None:
    from . import registration  # noqa: F401  (registers with verl)
