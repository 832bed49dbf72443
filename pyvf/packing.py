"""Packed batches of [prompt | reasoning | answer | post] sequences, and a planner that
splits a rollout batch into micro-batches without ever splitting a group.

Conventions (shared by the trainer and the losses):
- `targets[t]` is the next token, input_ids[t + 1], where a loss or a reward needs its
  log-prob, and `ignore_index` elsewhere (prompt tokens, the last token of each
  sequence), so `token_logprobs(hidden, weight, targets)` skips every other row.
- `roles[t]` is the role of `targets[t]` (0 where it is ignored), so `roles` lines up
  with the log-probs: ROLE_REASONING rows sum to the reasoning log-prob, ROLE_ANSWER
  rows to the log-prob of the reference answer.
- `token_roles[t]` is the role of input_ids[t] itself; `unpack` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

ROLE_PROMPT, ROLE_REASONING, ROLE_ANSWER, ROLE_POST = 0, 1, 2, 3
IGNORE_INDEX = -100


@dataclass
class Sequence:
    """One training sequence: the prompt, the model's reasoning (through the marker),
    the answer being scored, optional post-answer tokens (PCL), and its group."""
    prompt_ids: list[int]
    reasoning_ids: list[int]
    answer_ids: list[int]
    group: int
    post_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.reasoning_ids) + len(self.answer_ids) + len(self.post_ids)

    def token_roles(self) -> list[int]:
        return ([ROLE_PROMPT] * len(self.prompt_ids) + [ROLE_REASONING] * len(self.reasoning_ids)
                + [ROLE_ANSWER] * len(self.answer_ids) + [ROLE_POST] * len(self.post_ids))

    def ids(self) -> list[int]:
        return list(self.prompt_ids) + list(self.reasoning_ids) + list(self.answer_ids) + list(self.post_ids)


@dataclass
class PackedBatch:
    input_ids: torch.Tensor     # [T] int64
    position_ids: torch.Tensor  # [T] int64, restarting at 0 in each sequence
    cu_seqlens: torch.Tensor    # [B + 1] int64 (int32 for flash-attn: .int())
    targets: torch.Tensor       # [T] int64, next token or ignore_index
    roles: torch.Tensor         # [T] int64, role of targets[t]
    token_roles: torch.Tensor   # [T] int64, role of input_ids[t]
    groups: torch.Tensor        # [B] int64
    ignore_index: int = IGNORE_INDEX

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def max_seqlen(self) -> int:
        return int(self.cu_seqlens.diff().max()) if self.num_sequences else 0

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(getattr(self, f).to(device) for f in
                             ("input_ids", "position_ids", "cu_seqlens", "targets", "roles", "token_roles",
                              "groups")), ignore_index=self.ignore_index)

    def padded(self, pad_id: int = 0) -> "PaddedBatch":
        """The same batch as [B, L] tensors, right-padded, for models without varlen attention."""
        b, length = self.num_sequences, self.max_seqlen
        lengths = self.cu_seqlens.diff()
        row = torch.repeat_interleave(torch.arange(b), lengths)
        col = self.position_ids

        def scatter(values, fill):
            out = torch.full((b, length), fill, dtype=values.dtype)
            out[row, col] = values
            return out

        mask = torch.zeros((b, length), dtype=torch.long)
        mask[row, col] = 1
        return PaddedBatch(
            input_ids=scatter(self.input_ids, pad_id), attention_mask=mask,
            position_ids=scatter(self.position_ids, 0), targets=scatter(self.targets, self.ignore_index),
            roles=scatter(self.roles, ROLE_PROMPT), groups=self.groups.clone(), ignore_index=self.ignore_index,
        )


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor       # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 on real tokens
    position_ids: torch.Tensor    # [B, L]
    targets: torch.Tensor         # [B, L], ignore_index on padding
    roles: torch.Tensor           # [B, L], role of targets
    groups: torch.Tensor          # [B]
    ignore_index: int = IGNORE_INDEX

    def flat_positions(self) -> torch.Tensor:
        """Indices into the flattened [B * L] view of the real (unpadded) tokens, in
        packed order: hidden.view(B * L, H)[idx] lines up with the packed batch."""
        return self.attention_mask.flatten().nonzero().squeeze(1)


def pack(sequences: Seq[Sequence], *, ignore_index: int = IGNORE_INDEX) -> PackedBatch:
    """Concatenates sequences into one packed batch (see the module docstring)."""
    if not sequences:
        raise ValueError("sequences must not be empty")
    ids, token_roles, positions, cu = [], [], [], [0]
    for i, s in enumerate(sequences):
        n = len(s)
        if n == 0:
            raise ValueError(f"sequences[{i}] has no tokens")
        ids += s.ids()
        token_roles += s.token_roles()
        positions += range(n)
        cu.append(cu[-1] + n)
    input_ids = torch.tensor(ids, dtype=torch.long)
    token_roles_t = torch.tensor(token_roles, dtype=torch.long)
    cu_t = torch.tensor(cu, dtype=torch.long)
    # Next-token targets: shift left; the last token of each sequence has none.
    roles = torch.full_like(token_roles_t, ROLE_PROMPT)
    roles[:-1] = token_roles_t[1:]
    last = cu_t[1:] - 1
    roles[last] = ROLE_PROMPT
    targets = torch.full_like(input_ids, ignore_index)
    trained = roles != ROLE_PROMPT
    shifted = torch.empty_like(input_ids)
    shifted[:-1] = input_ids[1:]
    targets[trained] = shifted[trained]
    return PackedBatch(input_ids=input_ids, position_ids=torch.tensor(positions, dtype=torch.long),
                       cu_seqlens=cu_t, targets=targets, roles=roles, token_roles=token_roles_t,
                       groups=torch.tensor([s.group for s in sequences], dtype=torch.long),
                       ignore_index=ignore_index)


def unpack(batch: PackedBatch) -> list[Sequence]:
    """The sequences a packed batch was built from."""
    out = []
    ids, roles = batch.input_ids.tolist(), batch.token_roles.tolist()
    cu, groups = batch.cu_seqlens.tolist(), batch.groups.tolist()
    for b in range(len(cu) - 1):
        seq_ids, seq_roles = ids[cu[b]:cu[b + 1]], roles[cu[b]:cu[b + 1]]
        parts = {r: [t for t, rr in zip(seq_ids, seq_roles) if rr == r] for r in range(4)}
        out.append(Sequence(prompt_ids=parts[ROLE_PROMPT], reasoning_ids=parts[ROLE_REASONING],
                            answer_ids=parts[ROLE_ANSWER], post_ids=parts[ROLE_POST], group=groups[b]))
    return out


def plan_micro_batches(lengths: Seq[int], groups: Seq[int], token_budget: int) -> list[list[int]]:
    """Splits sequences (given by their lengths and group ids) into micro-batches of at
    most `token_budget` tokens, never splitting a group (fused VeriFree needs every
    reward of a group in its forward; give each sequence its own id to pack sequences
    freely). Returns lists of sequence indices;
    groups are placed largest first into the first micro-batch with room (first-fit
    decreasing), sequences keep their relative order inside a micro-batch."""
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
    if len(lengths) != len(groups):
        raise ValueError(f"lengths and groups must have the same length, got {len(lengths)} and {len(groups)}")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    sizes = {g: sum(int(lengths[i]) for i in idx) for g, idx in members.items()}
    for g, size in sizes.items():
        if size > token_budget:
            raise ValueError(f"group {g} has {size} tokens, more than the micro-batch token budget "
                             f"({token_budget}); raise the budget or shorten the sequences")
    bins: list[list[int]] = []
    room: list[int] = []
    for g in sorted(members, key=lambda g: -sizes[g]):  # stable: ties keep first-seen order
        for b, free in enumerate(room):
            if sizes[g] <= free:
                bins[b].append(g)
                room[b] -= sizes[g]
                break
        else:
            bins.append([g])
            room.append(token_budget - sizes[g])
    return [sorted(i for g in b for i in members[g]) for b in bins]
