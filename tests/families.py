"""Tiny, offline stand-ins for real causal-LM families: random-weight models and look-alike tokenizers.

Not a test file. ``build(name)`` returns ``(model, tokenizer, expected_bos_prefix)`` for each name in
``FAMILIES``. Each model comes from its family's own transformers Config class (2 layers, hidden 32,
no dropout, seeded, in eval mode). Each tokenizer is that family's own transformers tokenizer class,
built from a small BPE trained here on English text (no files, no Hub). It copies the real Hub
tokenizer's special tokens: which BOS and EOS it has, and whether ``tokenizer(text)`` prepends the BOS.
``expected_bos_prefix`` is ``[bos_id]`` when the real tokenizer prepends BOS, else ``[]``.
``real_hub_facts`` says, per family, where each of these facts comes from.
"""

from __future__ import annotations

import functools
import json

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

FAMILIES = ("gpt2", "llama", "qwen2", "gemma2", "opt", "bloom", "granite")

real_hub_facts = {
    "gpt2": "openai-community/gpt2: GPT2Tokenizer; transformers defaults bos=eos=unk='<|endoftext|>' "
    "(id 50256, last in vocab), pad None, add_bos_token False -> no BOS prepended.",
    "llama": "meta-llama/Llama-2: LlamaTokenizer (Metaspace BPE + byte fallback, <unk>=0 <s>=1 </s>=2, "
    "<0x00>..<0xFF> next); tokenizer.json post-processor prepends <s> (add_bos_token True). Llama 3 "
    "does the same with <|begin_of_text|>. In v5 LlamaTokenizer() built from scratch does NOT add BOS "
    "unless add_bos_token=True is passed (TokenizersBackend defaults it to False), so it is passed here.",
    "qwen2": "Qwen/Qwen2: Qwen2Tokenizer defaults bos_token=None, eos=pad=unk='<|endoftext|>' (an added "
    "token after the BPE vocab); no BOS anywhere. Qwen2Config bos/eos ids default to None.",
    "gemma2": "google/gemma-2: GemmaTokenizer (auto mapping gemma2 -> GemmaTokenizer); <pad>=0 <eos>=1 "
    "<bos>=2 <unk>=3 <mask>=4; tokenizer_config add_bos_token True -> <bos> prepended. Gemma2Config "
    "pad/eos/bos ids 0/1/2, final_logit_softcapping 30.0 (logits = cap*tanh(logits/cap)); the tiny model "
    "here uses cap 1.0 so the transform is measurable on random weights.",
    "opt": "facebook/opt: auto mapping opt -> GPT2Tokenizer; <s>=0 <pad>=1 </s>=2 <unk>=3; "
    "bos=eos='</s>' (id 2), tokenizer_config add_bos_token True -> '</s>' prepended. OPTConfig "
    "pad/bos/eos ids 1/2/2.",
    "bloom": "bigscience/bloom: BloomTokenizerFast (v5 maps it to plain TokenizersBackend); <unk>=0 <s>=1 "
    "</s>=2 <pad>=3; tokenizer.json has a ByteLevel post-processor, no template -> no BOS prepended. "
    "v4 test_tokenization_bloom: 'The quick brown fox</s>' -> [2175, 23714, 73173, 144252, 2].",
    "granite": "ibm-granite/granite-3.x: GPT2Tokenizer-style byte-level BPE (v5 auto mapping granite -> "
    "TokenizersBackend), bos=eos=pad=unk='<|end_of_text|>' at id 0, add_bos_token False -> no BOS "
    "prepended; config bos/eos/pad ids 0. (Granite 3 spells it <|end_of_text|>, not GPT-2's "
    "<|endoftext|>.) GraniteConfig logits_scaling divides the logits; real 3.0-2b uses 8.0.",
}

# Enough ordinary English (and the Alpaca prompt layout) for a few hundred merges.
_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\nName a color.\n\n### Response:\nBlue.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1. Eat a balanced diet.\n"
    "2. Exercise regularly.\n3. Get enough sleep.",
    "### Instruction:\nTranslate the sentence into French.\n\n### Input:\nThe cat is on the table.\n\n"
    "### Response:\nLe chat est sur la table.",
    "### Instruction:\nWhat is the capital of France?\n\n### Response:\nThe capital of France is Paris.",
    "### Instruction:\nAdd 12 and 30.\n\n### Input:\n12 + 30\n\n### Response:\n42",
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells!",
    "Red, green, blue, yellow, orange, purple, black and white are colors.",
    "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
    "A list: apples, bananas, cherries, dates, eggs, flour, grapes, honey, ice, jam.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and 3.14 or 2,718.",
    "Summarize the following paragraph in one sentence. Explain why the sky is blue.",
    "Write a short poem about the ocean. Describe your favorite book. Classify these animals.",
    "It's a good day, isn't it? Yes -- we'll see; they're here, you've done it, I'm happy, he'd go.",
    "Questions: who, what, when, where, why, how? Answers: someone, something, sometime, somewhere.",
    "\"Quoted text\" and 'single quotes', brackets [like this], braces {like that}, slashes a/b, "
    "hash #tag, at @user, percent 50%, dollars $5, ampersand & more, star *, caret ^, tilde ~, "
    "underscore _, pipe |, backslash \\, less < greater >, equals =, plus +, minus -, colon :, semicolon ;.",
    "Tabs\tand\tnewlines\nare whitespace too.\n\nThe end.",
    "Machine learning models learn patterns from data. Language models predict the next token.",
    "The model generates a response for each instruction in the evaluation set.",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz",
]

_BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
_MERGES_ROUNDS = 3  # the corpus is repeated so pair counts are stable


def _train(normalizer, pre_tokenizer, vocab_size, alphabet=()):
    """Train a BPE model on the corpus; return (vocab as ordered list of tokens, merges)."""
    tok = Tokenizer(BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = BpeTrainer(vocab_size=vocab_size, show_progress=False, initial_alphabet=list(alphabet),
                         special_tokens=[])
    tok.train_from_iterator(_CORPUS * _MERGES_ROUNDS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def _ordered(*groups):
    """A token -> id dict from groups of tokens, first occurrence wins."""
    vocab: dict[str, int] = {}
    for group in groups:
        for token in group:
            vocab.setdefault(token, len(vocab))
    return vocab


@functools.lru_cache(maxsize=None)
def _byte_level_bpe():
    """GPT-2 style byte-level BPE (used by gpt2, opt, granite)."""
    return _train(None, pre_tokenizers.ByteLevel(add_prefix_space=False), 400,
                  pre_tokenizers.ByteLevel.alphabet())


@functools.lru_cache(maxsize=None)
def _qwen2_bpe():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return _train(normalizers.NFC(), pre, 400, pre_tokenizers.ByteLevel.alphabet())


_BLOOM_SPLIT = Regex(" ?[^(\\s|[.,!?…。，、।۔،])]+")


def _bloom_pre_tokenizer():
    # bigscience/bloom tokenizer.json: Split(regex, isolated) then ByteLevel without its own regex.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(_BLOOM_SPLIT, behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


@functools.lru_cache(maxsize=None)
def _bloom_bpe():
    return _train(None, _bloom_pre_tokenizer(), 400, pre_tokenizers.ByteLevel.alphabet())


@functools.lru_cache(maxsize=None)
def _metaspace_bpe(prepend_scheme):
    """SentencePiece-like BPE pieces ('▁word'); byte fallback covers the rest (llama, gemma)."""
    normalizer = normalizers.Replace(" ", "▁") if prepend_scheme == "never" else None
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=True)
    return _train(normalizer, pre, 250)


def tokenizer(name):
    """A fresh look-alike tokenizer of one family (the trained BPE behind it is cached, so this is fast)."""
    from transformers import (GemmaTokenizer, GPT2Tokenizer, LlamaTokenizer, Qwen2Tokenizer,
                              TokenizersBackend)

    if name == "gpt2":
        tokens, merges = _byte_level_bpe()
        vocab = _ordered(tokens, ["<|endoftext|>"])  # GPT-2 keeps it last (50256)
        return GPT2Tokenizer(vocab=vocab, merges=merges)
    if name == "opt":
        tokens, merges = _byte_level_bpe()
        vocab = _ordered(["<s>", "<pad>", "</s>", "<unk>"], tokens)
        return GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>",
                             unk_token="<unk>", pad_token="<pad>", add_bos_token=True)
    if name == "granite":
        tokens, merges = _byte_level_bpe()
        vocab = _ordered(["<|end_of_text|>"], tokens)
        return GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="<|end_of_text|>",
                             eos_token="<|end_of_text|>", unk_token="<|end_of_text|>",
                             pad_token="<|end_of_text|>")
    if name == "qwen2":
        tokens, merges = _qwen2_bpe()
        return Qwen2Tokenizer(vocab=_ordered(tokens), merges=merges)  # adds <|endoftext|> after the vocab
    if name == "bloom":
        tokens, merges = _bloom_bpe()
        vocab = _ordered(["<unk>", "<s>", "</s>", "<pad>"], tokens)
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
        backend.pre_tokenizer = _bloom_pre_tokenizer()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.decoder = decoders.ByteLevel()
        return TokenizersBackend(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>", pad_token="<pad>", padding_side="left")
    if name == "llama":
        tokens, merges = _metaspace_bpe("first")
        vocab = _ordered(["<unk>", "<s>", "</s>"], _BYTE_TOKENS, tokens)
        return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    if name == "gemma2":
        tokens, merges = _metaspace_bpe("never")
        vocab = _ordered(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], _BYTE_TOKENS, tokens)
        return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    raise KeyError(f"unknown family {name!r}; expected one of {FAMILIES}")


_PREPENDS_BOS = {"gpt2": False, "llama": True, "qwen2": False, "gemma2": True, "opt": True,
                 "bloom": False, "granite": False}

_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def config(name, tok):
    """The tiny Config of one family, its special-token ids matching ``tok``."""
    from transformers import (BloomConfig, Gemma2Config, GPT2Config, GraniteConfig, LlamaConfig,
                              OPTConfig, Qwen2Config)

    vocab_size = -(-len(tok) // 8) * 8  # covers every token, rounded up like real checkpoints
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if name == "llama":
        return LlamaConfig(vocab_size=vocab_size, attention_dropout=0.0, tie_word_embeddings=False,
                           **_TINY, **ids)
    if name == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, attention_dropout=0.0, tie_word_embeddings=True,
                           **_TINY, **ids)
    if name == "gemma2":
        # Real Gemma 2 caps logits at 30.0; random tiny logits stay under 0.5, where a cap of 30 changes them by
        # ~3e-5 only. A cap of 1.0 keeps the same code path but makes skipping it plainly visible (~0.03).
        return Gemma2Config(vocab_size=vocab_size, head_dim=8, query_pre_attn_scalar=8, sliding_window=64,
                            attention_dropout=0.0, final_logit_softcapping=1.0, attn_logit_softcapping=50.0,
                            **_TINY, **ids)
    if name == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=256,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, **ids)
    if name == "bloom":
        return BloomConfig(vocab_size=vocab_size, hidden_size=32, n_layer=2, n_head=4,
                           hidden_dropout=0.0, attention_dropout=0.0, **ids)
    if name == "granite":
        # granite-3.0-2b-base multipliers, so the logits really are rescaled.
        return GraniteConfig(vocab_size=vocab_size, attention_dropout=0.0, tie_word_embeddings=True,
                             logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22,
                             attention_multiplier=0.125, **_TINY, **ids)
    raise KeyError(f"unknown family {name!r}; expected one of {FAMILIES}")


def build(name, seed=0):
    """(model, tokenizer, expected_bos_prefix) for one family; a fresh seeded model in eval mode."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(name, tok))
    model.eval()
    prefix = [tok.bos_token_id] if _PREPENDS_BOS[name] else []
    return model, tok, prefix
