"""Tiny instruct decoders with the real tokenizer layouts of the LLMs ftctl's users fine-tune: Llama-3.x, Qwen2.5,
Phi-3, Phi-4 and Gemma-2. Each has its family's architecture (random weights, 2 layers), special tokens, BOS
behaviour and a chat template that renders the family's published turn format:

- Llama-3 Instruct: `<|begin_of_text|>` (added by the template, and by the tokenizer too), turns
  `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`; end of turn `<|eot_id|>`;
- Qwen2.5 Instruct: no BOS, `<|im_start|>role\\n...<|im_end|>\\n`, a default system turn; end of turn `<|im_end|>`;
- Phi-3: `<s>` added by the tokenizer, `<|user|>\\n...<|end|>\\n<|assistant|>\\n`; end of turn `<|end|>`;
- Phi-4: no BOS, `<|im_start|>role<|im_sep|>...<|im_end|>`; end of turn `<|im_end|>`;
- Gemma-2 Instruct: `<bos>` (template and tokenizer), `<start_of_turn>user\\n...<end_of_turn>\\n`, the assistant
  called `model`, no system role; end of turn `<end_of_turn>`.
Built here from config objects and the `tokenizers` library: no hub, no downloads.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny import corpus

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] in ['system', 'user', 'assistant'] %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI4 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
GEMMA2 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# family: (pre-tokenizer style, special tokens, tokenizer attributes, token that starts every text or None, template,
#          end-of-turn token)
LAYOUTS = {
    "llama3": (
        "bytes",
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        "<|begin_of_text|>",
        LLAMA3,
        "<|eot_id|>",
    ),
    "qwen2.5": (
        "bytes",
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        None,
        QWEN25,
        "<|im_end|>",
    ),
    "phi3": (
        "metaspace",
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<|endoftext|>"},
        "<s>",
        PHI3,
        "<|end|>",
    ),
    "phi4": (
        "bytes",
        ["<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"],
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        None,
        PHI4,
        "<|im_end|>",
    ),
    "gemma2": (
        "metaspace",
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
        "<bos>",
        GEMMA2,
        "<end_of_turn>",
    ),
}
CHAT_FAMILIES = tuple(LAYOUTS)
# the words of the prompts ftctl writes, so that the tiny tokenizers merge them as real ones do (byte by byte, a
# few-shot prompt would not fit the context)
PROMPT_WORDS = [
    "What is the sentiment of this sentence? Answer with one of: negative, positive.",
    "Classify the text. Answer with one of: negative, positive.",
    "Summarize the following article.",
    "Translate English to Romanian.",
    "Answer the question with a short span from the context.",
    "Text: Answer: Summary: Context: Question: English: Romanian: You are a helpful assistant. system user assistant",
]


def end_of_turn(family: str) -> str:
    return LAYOUTS[family][5]


def build_tokenizer(family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    style, specials, attributes, bos, template, _ = LAYOUTS[family]
    if style == "bytes":  # GPT-4/tiktoken-style byte-level BPE (Llama-3, Qwen2.5, Phi-4)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        tok.train_from_iterator(corpus() + PROMPT_WORDS * 20, trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=alphabet))  # fmt: skip
    else:  # SentencePiece-style with byte fallback (Phi-3, Gemma-2): a character outside the vocabulary (a newline)
        # becomes its UTF-8 bytes as <0xNN> tokens, which decode back to it
        trained = Tokenizer(models.BPE(unk_token="<unk>"))
        trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # no space after special tokens
        trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials)
        trained.train_from_iterator(corpus() + PROMPT_WORDS * 20, trainer)
        saved = json.loads(trained.to_str())["model"]
        vocab = dict(saved["vocab"])
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved["merges"]]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
        tok.add_special_tokens(specials)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback(), decoders.Fuse()]
        )
    if bos:  # the tokenizer adds BOS to every text, as the real ones do
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **attributes)
    tokenizer.chat_template = template
    return tokenizer


def build_model(family: str, tokenizer):
    import torch
    import transformers as t

    torch.manual_seed(0)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if family == "llama3":
        return t.LlamaForCausalLM(t.LlamaConfig(**common))
    if family == "qwen2.5":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**common))
    if family in ("phi3", "phi4"):
        return t.Phi3ForCausalLM(t.Phi3Config(**common))
    if family == "gemma2":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=8))
    raise ValueError(family)


def save_chat_model(family: str, directory: Path) -> Path:
    tokenizer = build_tokenizer(family)
    model = build_model(family, tokenizer)
    turn_end = tokenizer.convert_tokens_to_ids(end_of_turn(family))
    model.generation_config.eos_token_id = [turn_end, tokenizer.eos_token_id]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
