"""Prompts on the real tokenizer layouts of the LLMs users fine-tune (tests/chat_models.py: Llama-3, Qwen2.5, Phi-3,
Phi-4, Gemma-2), checked token by token: the rendered prompt is the tokenizer's own chat template, the prompt is
masked out of the loss, the answer ends with the template's end-of-turn token and that token is learned, BOS comes
exactly once, generation stops at the end of the turn; plain and T5 formats; the constrained label scorer against a
log-likelihood computed by hand; deterministic, balanced few-shot prompts; template errors."""

from __future__ import annotations

import chat_models
import datasets
import pytest
import torch
from chat_models import CHAT_FAMILIES

from ftctl.errors import FtctlError
from ftctl.models import model_family
from launch.run.config import resolve_values

DOCUMENT = "the film was good and the plot was lovely"


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict:
    """Each layout saved once: {family: directory}."""
    root = tmp_path_factory.mktemp("chat")
    return {family: chat_models.save_chat_model(family, root / family) for family in CHAT_FAMILIES}


def bound_task(model_dir, task: str = "summarization", **options):
    """A task resolved from options as a run resolves them, bound to the model and its prepared tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    values = {"task": task, "model": str(model_dir), "train_file": "unused.jsonl", **options}
    resolved = resolve_values(values)
    config = AutoConfig.from_pretrained(model_dir)
    family = model_family(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task_ = resolved.task
    task_.prepare_tokenizer(tokenizer, family)
    return task_.bind(fit=task_.check_model(config, family), tokenizer=tokenizer), tokenizer


def encode_one(task, example: dict):
    return task.encode(datasets.Dataset.from_list([example]), task.prepared_tokenizer)[0]


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_chat_layouts_token_by_token(chat, family):
    task, tokenizer = bound_task(chat[family])
    example = {"document": DOCUMENT, "summary": "good film"}
    row = encode_one(task, example)
    messages = [{"role": "user", "content": f"Summarize the following article.\n\n{DOCUMENT}"}]
    expected_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    end = tokenizer.convert_tokens_to_ids(chat_models.end_of_turn(family))
    target = tokenizer("good film", add_special_tokens=False)["input_ids"]
    prompt = row["prompt_ids"]
    # the prompt is the template's own rendering, tokenized whole, with one BOS where the family has one
    bos = tokenizer.bos_token_id
    assert tokenizer.decode(prompt) == (
        (tokenizer.bos_token if family == "phi3" else "") + expected_prompt
    )  # Phi-3's template writes no BOS: the tokenizer adds it, once
    assert prompt.count(bos) == (1 if bos is not None else 0) and (bos is None or prompt[0] == bos)
    # the answer: the target, then the end of the assistant turn, both learned; the prompt masked out
    assert row["input_ids"] == prompt + target + [end]
    assert row["labels"] == [-100] * len(prompt) + target + [end]
    assert task.stop_ids()[0] == end and tokenizer.eos_token_id in task.stop_ids()
    # generated text is cut where the turn ends
    assert task.texts([target + [end] + target]) == ["good film"]
    record = task.prompt_record(example)
    assert record["mode"] == "chat" and record["end_of_answer"] == chat_models.end_of_turn(family)
    assert record["first_example"]["prompt"] == tokenizer.decode(prompt, skip_special_tokens=False).removeprefix(
        tokenizer.bos_token if family == "phi3" else ""
    )


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_system_prompt_is_a_turn_or_opens_the_user_turn(chat, family):
    task, tokenizer = bound_task(chat[family], system_prompt="Be brief.")
    head, body, tail = task.prompt_parts({"document": DOCUMENT, "summary": "x"})
    text = head + body + tail
    user = f"Summarize the following article.\n\n{DOCUMENT}"
    if family == "gemma2":  # its template refuses a system turn: the system prompt opens the user turn
        messages = [{"role": "user", "content": f"Be brief.\n\n{user}"}]
    else:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}]
    assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_plain_and_t5_formats(chat, models):
    plain, tokenizer = bound_task(chat["llama3"], chat_template="off")
    row = encode_one(plain, {"document": DOCUMENT, "summary": "good film"})
    text = f"Summarize the following article.\n\n{DOCUMENT}\n\nSummary:"
    assert tokenizer.decode(row["prompt_ids"]) == tokenizer.bos_token + text
    answer = tokenizer(" good film", add_special_tokens=False)["input_ids"]  # after a space
    assert row["input_ids"][len(row["prompt_ids"]) :] == answer + [
        tokenizer.eos_token_id
    ]  # a plain answer ends with EOS
    t5, t5_tokenizer = bound_task(models["t5"])
    row = encode_one(t5, {"document": DOCUMENT, "summary": "good film"})
    assert row["input_ids"] == t5_tokenizer(f"summarize: {DOCUMENT}")["input_ids"]  # T5 keeps its task prefix


def test_a_prompt_template_and_its_errors(chat, models):
    task, tokenizer = bound_task(chat["qwen2.5"], prompt_template="TL;DR of: {text}")
    head, body, tail = task.prompt_parts({"document": DOCUMENT, "summary": "x"})
    assert "<|im_start|>user\nTL;DR of: " + DOCUMENT + "<|im_end|>" in head + body + tail
    with pytest.raises(FtctlError, match=r"no field '\{document\}'; fields: \{instruction\}, \{text\}"):
        bound_task(chat["qwen2.5"], prompt_template="{document}")
    with pytest.raises(FtctlError, match="--chat-template on: the model is a decoder whose tokenizer has no chat"):
        bound_task(models["gpt2"], chat_template="on")[0].prompt_format()


def test_the_body_is_what_gets_shortened(chat):
    task, tokenizer = bound_task(chat["phi4"], max_length=64)
    long_document = " ".join(["lovely"] * 300)
    row = encode_one(task, {"document": long_document, "summary": "good"})
    assert len(row["input_ids"]) <= 64
    text = tokenizer.decode(row["prompt_ids"])
    assert text.startswith("<|im_start|>user<|im_sep|>Summarize the following article.")
    assert text.endswith("<|im_end|><|im_start|>assistant<|im_sep|>")  # the template's end survives


def by_hand(model, prompt_ids: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), one token at a time, without padding or batching."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(answer)))


def test_constrained_scores_equal_the_log_likelihood_by_hand(chat, tmp_path):
    """Labels that share their first token ("very good", "very bad") and one that is the start of another ("good"
    and "good enough"): every token of each label is scored, and the end of the answer tells prefixes apart."""
    from transformers import AutoModelForCausalLM

    from tasks._generation import GenerationCollator

    names = ["very good", "very bad", "good", "good enough"]
    task, tokenizer = bound_task(chat["llama3"], "classification_t2t", text_column=["text"], label_column="label")
    task = task.bind(state={"label_names": names, "label_values": names})
    rows = [{"text": t, "label": names[i % 4]} for i, t in enumerate(["a lovely film", "dull", "great acting here"])]
    encoded = task.encode(datasets.Dataset.from_list(rows), tokenizer)
    batch = GenerationCollator(tokenizer.pad_token_id)([dict(r) for r in encoded])  # left-padded prompts
    model = AutoModelForCausalLM.from_pretrained(chat["llama3"]).eval()
    with torch.no_grad():
        scores = task.choice_scores(
            model, {"input_ids": batch["generation_input_ids"], "attention_mask": batch["generation_attention_mask"]}
        )
    choices = task.choices()
    end = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert all(c[-1] == end for c in choices) and choices[0][0] == choices[1][0]  # shared first token
    for i, row in enumerate(encoded):
        for j, choice in enumerate(choices):
            assert float(scores[i, j]) == pytest.approx(by_hand(model, row["prompt_ids"], choice), abs=1e-4)


def test_few_shot_prompts_are_deterministic_and_balanced(chat):
    task, tokenizer = bound_task(chat["gemma2"], "sst2_t2t", text_column=["sentence"], label_column="label")
    task = task.bind(state={"label_names": ["negative", "positive"], "label_values": [0, 1]})
    train = datasets.Dataset.from_list([{"sentence": f"s{i}", "label": int(i % 5 == 0)} for i in range(50)])
    first, again = task.few_shot(train, 4, seed=7), task.few_shot(train, 4, seed=7)
    assert first == again and len(first) == 4
    assert sorted(s.target for s in first) == ["negative", "negative", "positive", "positive"]  # 10 of 50 positive
    shown = task.bind(shots=first)
    head, body, tail = shown.prompt_parts({"sentence": "the query", "label": 0})
    text = head + body + tail
    for shot in first:  # earlier turns: each example and its answer
        assert f"Text: {shot.fields['text']}<end_of_turn>\n<start_of_turn>model\n{shot.target}<end_of_turn>" in text
    assert text.count("<bos>") == 1 and text.endswith("Text: the query<end_of_turn>\n<start_of_turn>model\n")
