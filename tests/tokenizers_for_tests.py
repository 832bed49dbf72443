"""Tokenizers of different families, built in the tests (nothing is downloaded): the
shipped byte-level BPE, the same with an added special token that contains the
marker, and a SentencePiece-style Unigram with Metaspace that prepends a space to
every encode call."""

import functools

from pyvf.assets import load_tokenizer
from pyvf.data.synthetic import generate

# Also every character the splice tests use, so the Unigram model can encode them
# without <unk> (the splicing contract assumes a lossless tokenizer).
EXTRA_TEXT = ["数学题的答案是 8/5。", "答えは 1.6 です", "Ünïcödé façade — naïve café", "emoji 😀 and 🚀 too",
              "中文 \\frac{1}{2} x + 1 = -2.25 <<answer>> </answer>"]


@functools.lru_cache(maxsize=None)
def shipped_bpe():
    return load_tokenizer()


@functools.lru_cache(maxsize=None)
def bpe_with_special_answer():
    tok = load_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<answer>", "</answer>"]})
    return tok


@functools.lru_cache(maxsize=None)
def unigram_metaspace():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.prompt + p.completion for p in generate(3000, seed=7)] + EXTRA_TEXT * 20
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    alphabet = sorted(set("".join(texts)) | set("<>/\\{}.#0123456789abcdefghijklmnopqrstuvwxyz\n"))
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"], unk_token="<unk>",
                                      initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


ALL = {"bpe": shipped_bpe, "bpe-special-answer": bpe_with_special_answer, "unigram-metaspace": unigram_metaspace}
