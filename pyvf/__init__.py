"""pyvf: verifier-free reinforcement learning for language models.

The policy scores its own reasoning by the probability it gives the reference
answer (VeriFree), with fused kernels for the per-token log-probs and the
per-group advantages. See README.md.
"""

import torch  # noqa: F401  (loads libtorch before pyvf._C needs it)

from pyvf import ops
from pyvf._native import build_info

__version__ = "0.1.0"
__all__ = ["build_info", "ops", "__version__"]
