"""The public ops. Each dispatches on `backend` ("auto" follows the device) and
validates its inputs with ValueErrors that name the argument."""

from pyvf.ops.grouped_advantages import grouped_advantages
from pyvf.ops.policy_loss import policy_loss
from pyvf.ops.segment_sum import segment_sum
from pyvf.ops.token_logprobs import token_logprobs

__all__ = ["grouped_advantages", "policy_loss", "segment_sum", "token_logprobs"]
