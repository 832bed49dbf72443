"""Rebuilds the shipped tokenizer: byte-level BPE trained on the built-in tasks' text
(the arithmetic task with its PCL and question-writing prompts, the open-ended stories).

    python -m pyvf.assets.build_tokenizer [--out DIR] [--vocab-size 1024]

Byte-level, so any text (CJK, emoji) still encodes, through byte tokens. The result
is deterministic for a given tokenizers version: the corpus comes from a fixed seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyvf.assets import TOKENIZER_DIR
from pyvf.data import openended
from pyvf.data.synthetic import PCL_PROMPT_TEMPLATE, QUESTION_PROMPT, QUESTION_TEMPLATE, RATIONALIZE_TEMPLATE, generate
from pyvf.objectives.pcl import pcl_evaluation_text

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CORPUS_SEED = 20251122
CORPUS_SIZE = 20000


def corpus() -> list[str]:
    texts = []
    for k, p in enumerate(generate(CORPUS_SIZE, seed=CORPUS_SEED)):
        texts.append(p.prompt + p.completion + EOS)
        texts.extend(f" \\boxed{{{form}}}" for form in p.answers[1:])
        if k % 4 == 0:
            texts.append(PCL_PROMPT_TEMPLATE.format(question=p.question) + p.shortcut_completion
                         + pcl_evaluation_text(0.0, 1.0) + EOS)
            texts.append(p.completion + pcl_evaluation_text(1.0, 1.0) + EOS)
        if k % 8 == 1:
            texts.append(QUESTION_PROMPT + QUESTION_TEMPLATE.format(question=p.question) + EOS)
        if k % 8 == 2:
            texts.append(RATIONALIZE_TEMPLATE.format(question=p.question, reference=p.answers[0]) + p.completion
                         + " The reference answer is" + EOS)
    texts.extend(prompt + completion + EOS for prompt, completion in openended.warmup_pairs(5000, seed=CORPUS_SEED))
    return texts


def build(vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    tokenizer = build(args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(args.out))
    print(f"build_tokenizer: vocabulary {len(tokenizer)} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
