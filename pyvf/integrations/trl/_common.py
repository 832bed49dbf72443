"""What `VeriFreeTrainer` and `RLPRTrainer` share: the TRL pin, the reference column,
padding, the packed forward through the fused head and argument checks. Does not import
TRL (the package `__init__` reads `TESTED_TRL_VERSION` from here).
"""

from __future__ import annotations

import torch
from torch import nn

from pyvf.packing import Sequence, pack
from pyvf.runtime.model import choose_forward_mode

TESTED_TRL_VERSION = "1.16.0"
_INSTALL_HINT = f"pip install 'pyvf[trl]' (or pip install trl=={TESTED_TRL_VERSION})"


def _references(example: dict, column: str) -> list[str]:
    if column not in example:
        raise ValueError(f"the dataset needs an '{column}' column (a reference answer or a list of them); "
                         f"got columns {sorted(example)}")
    value = example[column]
    refs = [value] if isinstance(value, str) else list(value)
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise ValueError(f"'{column}' must be a non-empty string or a non-empty list of them, got {value!r}")
    return refs


def _closing_text(answer_template: str) -> str:
    """The last word of the rendered answer ('</answer>'): a completion cut by the length
    limit still counts when its answer was closed before the cut."""
    tail = answer_template.format(ref="\x00").split("\x00")[-1].split()
    return tail[-1] if tail else ""


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _right_pad(rows: list[list[int]], pad: int, device, width: int | None = None):
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _row(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


def _score_forward(model, sequences: list[Sequence], pad_id: int, device, layout_model: nn.Module):
    """Per-token log-probs (packed order) of packed sequences through the model's fused
    head: one decoder forward, `token_logprobs` on the rows that have a target. The
    layout is pyvf's (`pyvf.runtime.model.choose_forward_mode`, decided once per model):
    padding-free [1, T] with position_ids restarting per sequence where the attention
    takes it, else padded [B, L]. `model` may be wrapped (DDP, PEFT); `layout_model` is
    the transformers model underneath."""
    batch = pack(sequences)
    if choose_forward_mode(layout_model, device) == "packed":
        out = model(input_ids=batch.input_ids.to(device)[None], position_ids=batch.position_ids.to(device)[None],
                    shift_labels=batch.targets.to(device)[None], fused_lm_head=True)
        return out.log_probs[0], batch
    padded = batch.padded(pad_id=pad_id)
    out = model(input_ids=padded.input_ids.to(device), attention_mask=padded.attention_mask.to(device),
                position_ids=padded.position_ids.to(device), shift_labels=padded.targets.to(device),
                fused_lm_head=True)
    logp = out.log_probs.reshape(-1).index_select(0, padded.flat_positions().to(out.log_probs.device))
    return logp, batch


def _check_dataset_columns(dataset, column: str, name: str) -> None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list) and column not in names:
        raise ValueError(f"{name} needs a '{column}' column with the reference answer(s); it has {names}")


def _validate_common(cls_name, args, kwargs):
    for key in ("tools", "environment_factory"):
        if kwargs.get(key):
            raise ValueError(f"{cls_name} does not support `{key}`: the reward needs a single completion "
                             f"that ends in an answer")
    if args is None:
        return
    if args.beta != 0.0:
        raise ValueError(f"{cls_name} has no KL term to a reference model (docs/algorithms.md); set beta=0.0, "
                         f"got {args.beta}")
