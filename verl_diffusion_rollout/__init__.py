"""verl_diffusion_rollout: a diffusion rollout backend for verl.

Importing the package registers the ``diffusion`` rollout with verl (see :mod:`.registration`); verl also
imports that module by itself through its ``verl.plugins`` entry point.
"""

__version__ = "0.1.0"

from . import registration  # noqa: E402,F401  (registers with verl)
