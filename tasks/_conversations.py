"""Multi-turn conversations for instruction tuning: OpenAI `messages` (`role`/`content`) and ShareGPT
`conversations` (`from`/`value`), checked, rendered with the model's chat template, and masked so that the loss
covers every assistant turn (or the last one, or every token: `--train-on`).

The mask comes from the rendered text itself, not from guessed token ids: assistant turn i spans from the end of
the conversation before it, rendered with the generation prompt (`add_generation_prompt=True`), to where the
conversation up to and including it stops agreeing with the whole one (the turn's end-of-turn token is in the span:
the model learns to stop). Tokens are assigned to spans by the tokenizer's own character offsets. A template that
renders earlier turns differently once later ones follow (one that drops reasoning from past turns, say) cannot be
marked so: such turns are not learnt, and the run says how many once.

A conversation longer than `--max-length` loses its earliest exchanges first (the system prompt is kept), down to
its last one; only then is it cut at the end. How many were shortened is said once per split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jinja2

from ftctl.errors import FtctlError, warn

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "function": "tool", "observation": "tool"}  # fmt: skip
LAYOUTS = {"messages": ("role", "content", {r: r for r in ROLES}), "conversations": ("from", "value", SHAREGPT_ROLES)}
TRAIN_ON = ("assistant", "last", "all")

Turn = dict[str, str]


def column(columns: list[str]) -> str | None:
    """The column holding conversations, by its name: `messages` (OpenAI) or `conversations` (ShareGPT)."""
    return next((c for c in LAYOUTS if c in columns), None)


def turns_of(example: dict[str, Any], where: str) -> list[Turn]:
    """The conversation as OpenAI-style turns, checked: known roles, text content, a system prompt only first, user
    and assistant turns alternating (tool results after an assistant turn), ending with the assistant's reply."""
    key = column(list(example))
    if key is None:
        raise FtctlError(f"{where}: no `messages` or `conversations` list")
    role_key, text_key, roles = LAYOUTS[key]
    raw = example[key]
    if not isinstance(raw, list) or not raw:
        raise FtctlError(f"{where}: `{key}` must be a non-empty list of turns")
    turns: list[Turn] = []
    for n, turn in enumerate(raw, start=1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise FtctlError(f"{where}, turn {n}: each turn of `{key}` needs `{role_key}` and `{text_key}`")
        name, text = turn[role_key], turn[text_key]
        if name not in roles:
            raise FtctlError(
                f"{where}, turn {n}: unknown role {name!r} in `{key}`; roles: {', '.join(dict.fromkeys(roles))}"
            )
        if not isinstance(text, str):
            raise FtctlError(f"{where}, turn {n}: `{text_key}` must be a text, got {type(text).__name__}")
        turns.append({"role": roles[name], "content": text})
    check_order(turns, where)
    return turns


def check_order(turns: list[Turn], where: str) -> None:
    before = "start"
    for n, turn in enumerate(turns, start=1):
        role = turn["role"]
        allowed = {
            "start": ("system", "user"),
            "system": ("user",),
            "user": ("assistant",),
            "assistant": ("user", "tool"),
            "tool": ("tool", "assistant"),
        }[before]
        if role not in allowed:
            after = "the start" if before == "start" else f"a {before} turn"
            raise FtctlError(
                f"{where}, turn {n}: a {role} turn after {after}; turns go system (optional, first), then user "
                "and assistant in turn (tool results after an assistant turn)"
            )
        before = role
    if before != "assistant":
        raise FtctlError(f"{where}: the conversation must end with the assistant's reply (the response to learn)")
    if not turns[-1]["content"].strip():
        raise FtctlError(f"{where}: the last assistant reply is empty")


@dataclass
class Rendering:
    """How a model writes conversations: its chat template (with a system prompt folded into the first user turn
    where the template has no system role), or a plain `### Role:` layout for models without one."""

    tokenizer: Any
    chat: bool
    folded: bool = False

    def __call__(self, turns: list[Turn], generation_prompt: bool = False) -> str:
        if not self.chat:
            text = "".join(self._plain(t) for t in turns)
            return text + ("### Assistant:\n" if generation_prompt else "")
        if self.folded and turns and turns[0]["role"] == "system":
            turns = fold_system(turns)
        try:
            return str(
                self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
            )
        except jinja2.TemplateError as exc:
            if turns and turns[0]["role"] == "system" and not self.folded:
                self.folded = True  # Gemma: no system role; the system prompt opens the first user turn
                return self(turns, generation_prompt)
            raise FtctlError(f"the model's chat template refused a conversation: {exc}") from None

    def _plain(self, turn: Turn) -> str:
        end = (self.tokenizer.eos_token or "") if turn["role"] == "assistant" else ""  # the reply learns to stop
        return f"### {turn['role'].capitalize()}:\n{turn['content']}{end}\n\n"


def fold_system(turns: list[Turn]) -> list[Turn]:
    system, first, *rest = turns
    return [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]


def assistant_spans(render: Callable[..., str], turns: list[Turn]) -> tuple[str, list[tuple[int, int]], int]:
    """(the whole conversation's text, the character span of each assistant turn that could be marked, how many
    could not)."""
    whole = render(turns)
    spans, unmarked = [], 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, through = render(turns[:i], generation_prompt=True), render(turns[: i + 1])
        if not (through.startswith(before) and whole.startswith(before)):
            unmarked += 1
            continue
        end = len(before)
        limit = min(len(through), len(whole))
        while end < limit and through[end] == whole[end]:
            end += 1
        spans.append((len(before), end))
    return whole, spans, unmarked


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # the conversation before its last reply, with the generation prompt: what `generate` reads


@dataclass
class Encoder:
    """Token ids and labels of conversations, with the counts the run reports once per split."""

    tokenizer: Any
    render: Rendering
    max_length: int
    train_on: str
    bos: list[int]  # the tokenizer's BOS, put first where the rendered text does not start with it
    dropped: int = 0  # conversations that lost earliest exchanges
    cut: int = 0  # conversations cut at the end
    shortened: int = 0  # conversations that lost exchanges, were cut, or both
    unmarked: int = 0  # assistant turns the template could not mark
    unrendered: int = 0  # turns whose text the template left out (Phi-3's renders no tool turns)

    def ids_and_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise FtctlError(
                "multi-turn conversations need a fast tokenizer (character offsets) to mark the assistant turns; this "
                "model's tokenizer is a slow one"
            )
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        bos = [] if self.tokenizer.bos_token and text.startswith(self.tokenizer.bos_token) else self.bos
        return bos + list(enc["input_ids"]), [(0, 0)] * len(bos) + [tuple(o) for o in enc["offset_mapping"]]

    def encode(self, turns: list[Turn]) -> Encoded:
        shortened = False
        while True:
            text, spans, unmarked = assistant_spans(self.render, turns)
            ids, offsets = self.ids_and_offsets(text)
            if len(ids) <= self.max_length or sum(t["role"] == "assistant" for t in turns) <= 1:
                break
            turns = drop_first_exchange(turns)
            shortened = True
        self.dropped += shortened
        self.shortened += shortened or len(ids) > self.max_length
        self.unmarked += unmarked
        self.unrendered += sum(t["content"].strip() not in text for t in turns if t["content"].strip())
        if not spans:
            raise FtctlError(
                "the model's chat template renders a conversation differently once later turns follow, so not even "
                "its last reply could be marked; use --chat-template off (a plain layout) for this data"
            )
        chosen = spans if self.train_on == "assistant" else spans[-1:]
        labels = [  # a token is learnt when it lies wholly inside a span (never one that only begins there)
            token if self.train_on == "all" or any(a <= start and end <= b and end > 0 for a, b in chosen) else -100
            for token, (start, end) in zip(ids, offsets, strict=True)
        ]
        last = next((i for i, (start, end) in enumerate(offsets) if start >= spans[-1][0] and end > 0), len(ids))
        if len(ids) > self.max_length:
            self.cut += 1
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels, ids[: min(last, len(ids))])

    def report(self, split_size: int) -> None:
        if self.shortened:
            warn(
                f"{self.shortened} of {split_size} conversations are longer than --max-length "
                f"{self.max_length}: {self.dropped} lost their earliest exchanges, {self.cut} were cut at the end"
            )
        if self.unrendered:
            warn(
                f"the chat template leaves {self.unrendered} turn(s) out of the text it renders (a role it does not "
                "write, such as tool results); the model never reads them"
            )
        if self.unmarked:
            warn(
                f"the chat template renders earlier turns differently once later ones follow; {self.unmarked} "
                "assistant turn(s) could not be marked and are not learnt"
            )


def drop_first_exchange(turns: list[Turn]) -> list[Turn]:
    """Without the earliest user turn and what answered it (the system prompt kept)."""
    head = turns[:1] if turns[0]["role"] == "system" else []
    body = turns[len(head) :]
    first_reply = next(i for i, t in enumerate(body) if t["role"] == "assistant")
    rest = body[first_reply + 1 :]
    while rest and rest[0]["role"] == "tool":
        rest = rest[1:]
    return head + rest
