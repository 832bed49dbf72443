"""A model directory shaped like a hub instruct model (nothing downloaded): the shipped
tokenizer extended with ChatML special tokens and a chat template, <|im_end|> as the
tokenizer's EOS and both <|im_end|> and <|endoftext|> as the generation config's EOS
ids (as Qwen's instruct models have), and a tiny random Qwen3 model.

    path = chat_model_dir(tmp_path)                  # then pyvf train --model path ...
    path = chat_model_dir(tmp_path, pad=False)       # a tokenizer without a pad token
    path = chat_model_dir(tmp_path, vocab_shortfall=3)  # a model 3 tokens short
    path = chat_model_dir(tmp_path, bos=True)        # Llama-style: BOS added by default and by the template
"""

from __future__ import annotations

from pathlib import Path

from pyvf.assets import load_tokenizer

IM_START, IM_END, ENDOFTEXT, BOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>"

# ChatML, as Qwen writes it (without Qwen's tool-calling branches).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chat_tokenizer(*, pad: bool = True, bos: bool = False):
    tokenizer = load_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.add_tokens(["<think>", "</think>"])  # plain added tokens, as in Qwen3
    tokenizer.eos_token = IM_END
    tokenizer.chat_template = CHATML_TEMPLATE
    if bos:
        tokenizer.add_special_tokens({"bos_token": BOS})
        tokenizer.add_bos_token = True
        tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    if not pad:
        tokenizer.pad_token = None
    return tokenizer


def chat_model_dir(tmp_path: Path, *, pad: bool = True, bos: bool = False, vocab_shortfall: int = 0,
                   seed: int = 0) -> Path:
    """Saves the tokenizer and a random tiny Qwen3 (vocabulary len(tokenizer) -
    vocab_shortfall) to tmp_path / "chat-model" and returns that directory."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = chat_tokenizer(pad=pad, bos=bos)
    im_end, endoftext = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    config = Qwen3Config(
        vocab_size=len(tokenizer) - vocab_shortfall, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
        tie_word_embeddings=True, eos_token_id=im_end, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, endoftext], bos_token_id=tokenizer.bos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out = Path(tmp_path) / "chat-model"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
