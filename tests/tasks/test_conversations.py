"""Multi-turn conversations (tasks/_conversations.py) on the real chat layouts of tests/chat_models.py, token by
token: what the loss covers is written out by hand per layout, as the text of the learnt tokens; ShareGPT and
OpenAI layouts give the same ids and labels; bad conversations are one error line; long ones lose their earliest
exchanges first; a run trains on them end to end."""

from __future__ import annotations

import json

import chat_models
import datasets
import pytest
import torch
from chat_models import CHAT_FAMILIES
from test_prompts import bound_task

from ftctl.errors import run_main

SYSTEM = {"role": "system", "content": "Answer in one word."}
CONVERSATION = [  # three exchanges, a system prompt and a tool result
    SYSTEM,
    {"role": "user", "content": "was the film good"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "and the plot"},
    {"role": "assistant", "content": "lookup"},
    {"role": "tool", "content": "the plot was dull"},
    {"role": "assistant", "content": "negative"},
]
# the text of every learnt token, per layout: each assistant reply with what ends its turn
LEARNT = {
    "llama3": "positive<|eot_id|>lookup<|eot_id|>negative<|eot_id|>",
    "qwen2.5": "positive<|im_end|>\nlookup<|im_end|>\nnegative<|im_end|>\n",
    "phi3": "positive<|end|>\nlookup<|end|>\nnegative<|end|>\n<|endoftext|>",  # its template drops tool turns
    "phi4": "positive<|im_end|>lookup<|im_end|>negative<|im_end|>",
    "gemma2": "positive<end_of_turn>\nlookup<end_of_turn>\nnegative<end_of_turn>\n",
}


def conversation(family: str) -> list[dict]:
    """Gemma-2's template has no system role (the system prompt opens the first user turn) and refuses other roles
    than user and model: its tool result is given as a user turn."""
    if family != "gemma2":
        return CONVERSATION
    return [{**t, "role": "user"} if t["role"] == "tool" else t for t in CONVERSATION]


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("conversations")
    return {family: chat_models.save_chat_model(family, root / family) for family in CHAT_FAMILIES}


def encode(task, rows: list[dict]):
    return task.encode(datasets.Dataset.from_list(rows), task.prepared_tokenizer)


def learnt_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != -100])


@pytest.mark.parametrize("family", CHAT_FAMILIES)
def test_every_assistant_turn_is_learnt_and_nothing_else(chat, family, capsys):
    task, tokenizer = bound_task(chat[family], task="instruction")
    turns = conversation(family)
    row = encode(task, [{"messages": turns}])[0]
    rendered = turns
    if family == "gemma2":  # as Gemma users write it: the system prompt opens the first user turn
        rendered = [{"role": "user", "content": f"{SYSTEM['content']}\n\n{turns[1]['content']}"}, *turns[2:]]
    bos = tokenizer.bos_token if family == "phi3" else ""  # Phi-3's tokenizer adds BOS; its template does not

    def template(messages: list[dict], prompt: bool = False) -> str:
        return bos + tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    assert tokenizer.decode(row["input_ids"]) == template(rendered)
    assert learnt_text(tokenizer, row) == LEARNT[family]
    masked = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100])
    assert not {"positive", "lookup", "negative"} & set(masked.replace("<", " ").replace(">", " ").split())
    assert "was the film good" in masked and SYSTEM["content"] in masked
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    if family == "phi3":  # its template writes no tool turns: said once, not silently lost
        assert "the plot was dull" not in masked and len(warned) == 1 and "leaves 1 turn(s) out" in warned[0]
    else:
        assert "the plot was dull" in masked and not warned
    # what generation reads: the conversation before its last reply, with the generation prompt
    assert tokenizer.decode(row["prompt_ids"]) == template(rendered[:-1], prompt=True)


def test_the_loss_is_the_sum_over_assistant_tokens(chat):
    """The model's loss on an encoded conversation equals the mean negative log-likelihood of the assistant tokens
    picked out by their text (each reply's tokens and its end-of-turn), computed here by hand."""
    from transformers import AutoModelForCausalLM

    task, tokenizer = bound_task(chat["llama3"], task="instruction")
    row = encode(task, [{"messages": CONVERSATION}])[0]
    model = AutoModelForCausalLM.from_pretrained(chat["llama3"]).eval()
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=torch.tensor([row["labels"]])).loss
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    words = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("positive", "lookup", "negative")}
    picked, tokens = [], row["input_ids"]
    for word_ids in words.values():
        at = next(i for i in range(len(tokens)) if tokens[i : i + len(word_ids)] == word_ids)
        picked += list(range(at, at + len(word_ids) + 1))  # the reply and its <|eot_id|>
        assert tokens[at + len(word_ids)] == eot
    by_hand = -torch.stack([logprobs[p - 1, tokens[p]] for p in picked]).mean()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-5)


def test_sharegpt_and_openai_layouts_train_the_same(chat):
    task, _ = bound_task(chat["qwen2.5"], task="instruction")
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
    sharegpt = [{"from": names[t["role"]], "value": t["content"]} for t in CONVERSATION]
    a, b = encode(task, [{"messages": CONVERSATION}])[0], encode(task, [{"conversations": sharegpt}])[0]
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"] and a["prompt_ids"] == b["prompt_ids"]


@pytest.mark.parametrize("train_on, learnt", [("last", "negative<|eot_id|>"), ("all", None)])
def test_train_on_the_last_reply_or_every_token(chat, train_on, learnt):
    task, tokenizer = bound_task(chat["llama3"], task="instruction", train_on=train_on)
    row = encode(task, [{"messages": CONVERSATION}])[0]
    if learnt is None:
        assert row["labels"] == row["input_ids"]
    else:
        assert learnt_text(tokenizer, row) == learnt


def test_a_long_conversation_loses_its_earliest_exchanges_first(chat, capsys):
    task, tokenizer = bound_task(chat["llama3"], task="instruction", max_length=100)
    long_turns = [SYSTEM]
    for i in range(6):
        long_turns += [{"role": "user", "content": f"question {i} about the film"},
                       {"role": "assistant", "content": f"answer{i}"}]  # fmt: skip
    row = encode(task, [{"messages": long_turns}, {"messages": CONVERSATION[:3]}])[0]
    text = tokenizer.decode(row["input_ids"])
    assert len(row["input_ids"]) <= 100 and SYSTEM["content"] in text and "answer5" in text and "question 0" not in text
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: 1 of 2 conversations are longer than --max-length 100: 1 lost their earliest exchanges, 0 were cut "
        "at the end"
    ]


BAD = {
    "unknown role": ([{"role": "bot", "content": "hi"}], "turn 1: unknown role 'bot' in `messages`"),
    "no reply": ([{"role": "user", "content": "hi"}], "must end with the assistant's reply"),
    "two users": (
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
        "turn 2: a user turn after a user turn",
    ),
    "assistant first": ([{"role": "assistant", "content": "a"}], "turn 1: a assistant turn after the start"),
    "system later": (
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "system", "content": "c"},
            {"role": "assistant", "content": "d"},
        ],
        "turn 3: a system turn after a assistant turn",
    ),  # fmt: skip
    "content not text": ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ["b"]}], "must be a text"),
    "sharegpt role": ([{"from": "robot", "value": "a"}], "unknown role 'robot' in `conversations`"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_conversation_files_are_one_line(case, chat, tmp_path, capsys):
    from launch.train import main

    turns, fragment = BAD[case]
    key = "conversations" if "from" in turns[0] else "messages"
    sharegpt = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    good = {"messages": CONVERSATION} if key == "messages" else {"conversations": sharegpt}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good, good, {key: turns}, good]))
    out = tmp_path / "out"
    code = run_main(main, ["--task", "instruction", "--model", str(chat["llama3"]), "--train-file", str(path),
                           "--output-dir", str(out), "--max-steps", "1", "--report-to", "none"])  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert not out.exists()


@pytest.mark.integration  # trains
def test_a_run_trains_on_sharegpt_conversations_and_answers_the_last_turn(chat, tmp_path):
    from launch.train import main

    rows = []
    for i in range(24):
        turns = [("system", "Answer in one word."), ("human", f"was film {i} good"), ("gpt", "yes"),
                 ("human", "and the plot"), ("gpt", ["dull", "fine"][i % 2])]  # fmt: skip
        rows.append({"conversations": [{"from": who, "value": text} for who, text in turns]})
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    main(["--task", "instruction", "--model", str(chat["qwen2.5"]), "--train-file", str(path), "--output-dir",
          str(out), "--max-steps", "4", "--batch-size", "4", "--report-to", "none", "--eval-strategy", "no",
          "--save-strategy", "no", "--num-samples", "2"])  # fmt: skip
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["train_on"] == "assistant" and record["metrics"]["perplexity"] > 1
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert predictions[0]["prompt"].endswith("and the plot<|im_end|>\n<|im_start|>assistant\n")
    assert predictions[0]["reference"] in ("dull", "fine") and "generated" in predictions[0]
