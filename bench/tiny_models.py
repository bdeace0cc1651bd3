"""Generative models with random weights and a real tokenizer trained on the benchmark's own text.

No pretrained generative model is available offline, so the generative benchmarks build their own: a byte-level BPE
tokenizer trained on the data's text and a T5, GPT-2 or Llama of a chosen size with random weights. Quality numbers
from them only show that a pipeline runs and learns; speed numbers are real for their shapes.
"""

from __future__ import annotations

from pathlib import Path

# size -> (hidden, feed-forward, layers, heads, vocabulary)
SIZES = {
    "tiny": (64, 128, 2, 4, 2000),  # pipeline checks
    "small": (256, 704, 4, 4, 8000),  # throughput measurements: compute, not Python overhead, dominates
}


def build_models(
    texts: list[str], folder: Path, families: tuple[str, ...] = ("t5", "gpt2"), size: str = "tiny"
) -> dict[str, Path]:
    """Save a model and tokenizer per family under `folder/<family>`; returns their directories."""
    import torch
    import transformers as t
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    hidden, ffn, layers, heads, vocab = SIZES[size]
    specials = {"t5": ["<pad>", "</s>", "<unk>"], "gpt2": ["<|endoftext|>"], "llama": ["<s>", "</s>", "<unk>"]}
    out = {}
    for family in families:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=specials[family], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(texts, trainer)
        torch.manual_seed(0)
        if family == "t5":
            tok.post_processor = processors.TemplateProcessing(
                single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
            )
            fast = t.PreTrainedTokenizerFast(
                tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
            )
            pad, eos = fast.pad_token_id, fast.eos_token_id
            config = t.T5Config(
                vocab_size=len(fast), d_model=hidden, d_ff=ffn, d_kv=hidden // heads, num_layers=layers,
                num_heads=heads, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad,
            )  # fmt: skip
            model = t.T5ForConditionalGeneration(config)
        elif family == "gpt2":
            fast = t.PreTrainedTokenizerFast(
                tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", model_max_length=512
            )
            config = t.GPT2Config(
                vocab_size=len(fast), n_embd=hidden, n_inner=ffn, n_layer=layers, n_head=heads, n_positions=512,
                bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
            )  # fmt: skip
            model = t.GPT2LMHeadModel(config)
        else:
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
            )
            fast = t.PreTrainedTokenizerFast(
                tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=1024
            )
            config = t.LlamaConfig(
                vocab_size=len(fast), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=1024,
                bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=True,
            )  # fmt: skip
            model = t.LlamaForCausalLM(config)
        model.save_pretrained(folder / family)
        fast.save_pretrained(folder / family)
        out[family] = folder / family
    return out
