"""Tiny models and real tokenizers, built here from config objects (no hub, no downloads).

Each family gets a tokenizer trained with the `tokenizers` library on the fixture corpus, with the special tokens
and post-processing its real counterpart has (BERT [CLS]/[SEP] WordPiece, GPT-2 byte-level BPE, Llama BPE with <s>,
T5 with </s> appended and <pad> = 0), and a 2-layer model saved as its pretraining class (MaskedLM, CausalLM,
Seq2SeqLM) the way hub checkpoints are.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ["good", "great", "excellent", "lovely", "wonderful", "superb", "delightful", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "boring", "dreadful", "dull", "horrible"]
FILLER = [
    "the",
    "film",
    "was",
    "really",
    "quite",
    "plot",
    "acting",
    "food",
    "service",
    "a",
    "very",
    "and",
    "music",
    "story",
    "book",
    "hotel",
    "room",
    "staff",
    "it",
    "felt",
    "show",
    "game",
]


def sentences(n: int, seed: int) -> list[dict]:
    """Synthetic sentiment: label 1 iff the sentence carries a positive word. Learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, rng.randint(2, 5))
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"sentence": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def corpus() -> list[str]:
    words = POSITIVE + NEGATIVE + FILLER
    rng = random.Random(0)
    text = [" ".join(rng.sample(words, 8)) for _ in range(400)]
    return text + [r["sentence"] for r in sentences(200, 1)]


def _fast(tokenizer, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=128, **special)


def build_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if family == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
        tok.decoder = decoders.WordPiece()
        return _fast(
            tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
        )
    if family == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            corpus(),
            trainers.BpeTrainer(
                vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
            ),
        )
        return _fast(tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    if family == "llama":
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if family == "t5":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(
            corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"])
        )
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
        )
        return _fast(tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    raise ValueError(family)


def bert_config(vocab: int, **extra):
    """The tiny BERT shape of the suite: 2 layers of width 32, 2 heads."""
    import transformers as t

    return t.BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **extra,
    )


def build_model(family: str, tokenizer):
    import torch
    import transformers as t

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if family == "bert":
        return t.BertForMaskedLM(bert_config(vocab, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2))
    if family == "gpt2":
        config = t.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return t.GPT2LMHeadModel(config)
    if family == "llama":
        config = t.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return t.LlamaForCausalLM(config)
    if family == "t5":
        config = t.T5Config(
            vocab_size=vocab,
            d_model=32,
            d_ff=64,
            d_kv=16,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        return t.T5ForConditionalGeneration(config)
    raise ValueError(family)


FAMILIES = ("bert", "gpt2", "llama", "t5")


def save_tiny(family: str, directory: Path) -> Path:
    tokenizer = build_tokenizer(family)
    model = build_model(family, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
