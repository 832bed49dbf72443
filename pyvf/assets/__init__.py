"""Files shipped with pyvf: the byte-level BPE tokenizer trained on the synthetic task
(and, once built, the tiny demo model). Nothing here is downloaded."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent
TOKENIZER_DIR = ASSETS / "tokenizer"


def load_tokenizer(path: str | Path | None = None):
    """The shipped tokenizer (or the one saved at `path`) as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path) if path is not None else TOKENIZER_DIR
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}; rebuild it with python -m pyvf.assets.build_tokenizer")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
