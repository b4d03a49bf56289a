"""A tiny random Llama with a locally trained tokenizer: a real model for vLLM without any download.

Its weights are random, so what it generates is noise; that is all a scheduler needs. Requests ask for
an exact number of tokens (``min_tokens = max_tokens``, ``ignore_eos``), so the text never matters,
while vLLM runs the real attention, paged KV cache and recompute preemption on it.

The shape is chosen for vLLM's CPU attention: a head dimension of 64 (256 hidden / 4 heads) and KV
blocks of 32 tokens are what its kernels accept.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llmsched_env.errors import ConfigError

#: Written beside the model, so that a directory can be recognised as one this function built.
MARKER = "llmsched-tiny-model.json"


def build_tiny_llama(out: str | Path, *, vocab_size: int = 2048, hidden_size: int = 256, layers: int = 2,
                     heads: int = 4, max_positions: int = 4096, seed: int = 0) -> Path:
    """Write a random ``LlamaForCausalLM`` and a byte-level BPE tokenizer trained on generated text to ``out``.

    Needs ``transformers`` and ``tokenizers`` (installed with vLLM). Deterministic for a given ``seed``.
    Raises :class:`~llmsched_env.errors.ConfigError` if ``out`` exists and is not empty.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; give a new directory for the tiny model")
    if hidden_size % heads or hidden_size // heads != 64:
        raise ConfigError(f"hidden_size / heads must be 64 (vLLM's CPU attention), got {hidden_size} / {heads}")
    try:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError as error:
        raise ConfigError(f"building the tiny model needs transformers and tokenizers (install the live-cpu "
                          f"extra): {error}") from None

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
             for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"vocab_size": vocab_size, "hidden_size": hidden_size, "layers": layers,
                                          "heads": heads, "max_positions": max_positions, "seed": seed}, indent=2))
    return out
