"""Token-exact reference splicing for VeriFree (docs/algorithms.md).

A sampled completion is cut at the first occurrence of the marker (`<answer`, no
closing `>`) in its decoded text, and the reference answer, rendered with the answer
template, is appended. Where the cut falls in token space decides what the policy
gradient trains, so:

- every sampled token whose text ends at or before the marker is kept verbatim. A
  token boundary counts when the decoded prefix up to it is a prefix of the decoded
  completion; a boundary inside a multi-byte character is not one;
- only the text from the last kept token up to and including the marker is tokenized
  again, chosen so that decode(reasoning_ids) == text[:pos] + marker exactly, also for
  tokenizers that prepend a space to every encode call (SentencePiece / Metaspace);
- the answer is tokenized on its own (the forced boundary of the official method).

Decoding runs O(log n) times per completion (a binary search over prefixes), not n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

DEFAULT_MARKER = "<answer"
DEFAULT_ANSWER_TEMPLATE = "> \\boxed{{{ref}}} </answer>"

# Texts put in front of the re-tokenized boundary and cut off again, for tokenizers
# whose encode call prepends a space: one of them usually forms its own tokens.
_SENTINELS = ("\n", "\n\n", ".", " ", "a", "0", "#")


@dataclass(frozen=True)
class Spliced:
    reasoning_ids: list[int]
    answer_ids: list[int]
    reference_span: slice   # the answer_ids that overlap the reference's characters
    found: bool
    n_kept: int             # leading reasoning_ids copied verbatim from the completion
    reference: str


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _kept_prefix(tokenizer, ids: list[int], target: str) -> int:
    """Largest k such that decode(ids[:k]) is a prefix of `target`."""
    def ok(k):
        return target.startswith(_decode(tokenizer, ids[:k]))

    # Decoded prefixes grow with k, so the boundary is found by bisection; the
    # linear steps after it absorb the rare non-monotone cases (a partial character
    # decoding to U+FFFD, tokens that decode to nothing).
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_decode(tokenizer, ids[:mid])) <= len(target):
            lo = mid
        else:
            hi = mid - 1
    k = lo
    while k > 0 and not ok(k):
        k -= 1
    while k < len(ids) and ok(k + 1):
        k += 1
    return k


def _boundary_tokens(tokenizer, kept: list[int], boundary: str, want: str) -> list[int] | None:
    """Tokens for `boundary` such that decode(kept + tokens) == want, or None."""
    candidates = [_encode(tokenizer, boundary)]
    for sentinel in _SENTINELS:
        head = _encode(tokenizer, sentinel)
        both = _encode(tokenizer, sentinel + boundary)
        if both[:len(head)] == head:
            candidates.append(both[len(head):])
    for tokens in candidates:
        if _decode(tokenizer, kept + tokens) == want:
            return tokens
    return None


def _reference_span(tokenizer, rendered: str, answer_ids: list[int], start: int, end: int) -> slice:
    """The answer tokens whose characters overlap rendered[start:end]."""
    enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if list(enc["input_ids"]) != answer_ids or len(offsets) != len(answer_ids):
        raise ValueError("the tokenizer gives no offset mapping for the answer; use a fast tokenizer")
    hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    return slice(hits[0], hits[-1] + 1) if hits else slice(0, 0)


def _render(answer_template: str, reference: str) -> tuple[str, int, int]:
    """The rendered answer and the character span of the reference inside it."""
    marker = "\x00pyvf-ref\x00"
    shaped = answer_template.format(ref=marker)
    if shaped.count(marker) != 1:
        raise ValueError(f"answer_template must contain {{ref}} exactly once, got {answer_template!r}")
    start = shaped.index(marker)
    rendered = answer_template.format(ref=reference)
    return rendered, start, start + len(reference)


def render_answer(tokenizer, answer_template: str, reference: str) -> tuple[list[int], slice]:
    """The reference rendered with `answer_template`, tokenized on its own, and the slice
    of those tokens that overlaps the reference's characters."""
    rendered, start, end = _render(answer_template, reference)
    answer_ids = _encode(tokenizer, rendered)
    return answer_ids, _reference_span(tokenizer, rendered, answer_ids, start, end)


def _splice_one(tokenizer, ids: list[int], text: str, reference: str, marker: str, answer_template: str,
                reasoning: tuple[list[int], int, bool] | None, include_marker: bool = True
                ) -> tuple[Spliced, tuple[list[int], int, bool]]:
    if not isinstance(reference, str) or not reference.strip():
        raise ValueError(f"reference must be a non-empty, non-whitespace string, got {reference!r}")
    if reasoning is None:
        pos = text.find(marker)
        if pos < 0:
            reasoning = (list(ids), len(ids), False)
        else:
            want = text[:pos] + (marker if include_marker else "")
            k = _kept_prefix(tokenizer, ids, text[:pos])
            while True:
                kept = ids[:k]
                tail = _boundary_tokens(tokenizer, kept, want[len(_decode(tokenizer, kept)):], want)
                if tail is not None or k == 0:
                    break
                k -= 1  # no faithful boundary after k tokens: re-tokenize one more
            if tail is None:
                raise ValueError(f"cannot tokenize the reasoning up to the marker so that it decodes back "
                                 f"exactly ({want[-40:]!r}); is the tokenizer lossless?")
            reasoning = (kept + tail, k, True)
    reasoning_ids, n_kept, found = reasoning
    if not found:
        return Spliced(reasoning_ids, [], slice(0, 0), False, n_kept, reference), reasoning
    answer_ids, span = render_answer(tokenizer, answer_template if include_marker else marker + answer_template,
                                     reference)
    return Spliced(list(reasoning_ids), answer_ids, span, True, n_kept, reference), reasoning


def splice_reference(tokenizer, completion_ids, reference, *, marker: str = DEFAULT_MARKER,
                     answer_template: str = DEFAULT_ANSWER_TEMPLATE, include_marker: bool = True):
    """Cuts a sampled completion at the first `marker` and appends the reference answer.

    tokenizer: a Hugging Face fast tokenizer. completion_ids: the sampled token ids
    (list or 1-D tensor). reference: a string, or a list of equivalent references
    (then one result per reference, sharing the reasoning). Returns `Spliced` with
    `reasoning_ids` (kept tokens + the re-tokenized boundary through the marker),
    `answer_ids` (the rendered answer tokenized on its own), `reference_span` (the
    slice of answer_ids overlapping the reference's characters), `found` and `n_kept`.
    Without a marker: reasoning_ids is the completion unchanged, answer_ids empty.
    `include_marker=False` cuts before the marker instead and starts the answer with it
    (marker + rendered template), for methods that score the whole answer block (NOVER).
    """
    if not isinstance(marker, str) or not marker:
        raise ValueError(f"marker must be a non-empty string, got {marker!r}")
    if hasattr(completion_ids, "tolist"):
        completion_ids = completion_ids.tolist()
    ids = [int(i) for i in completion_ids]
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    if not references:
        raise ValueError("reference must be a string or a non-empty list of strings")
    text = _decode(tokenizer, ids)
    results, reasoning = [], None
    for ref in references:
        result, reasoning = _splice_one(tokenizer, ids, text, ref, marker, answer_template, reasoning, include_marker)
        results.append(result)
    return results if isinstance(reference, (list, tuple)) else results[0]
