"""Prompt formats: how a prompted task's example becomes the text a model reads, the same way for training,
evaluation, the zero-/few-shot baseline and inference.

A task declares a `PromptSpec`: a default instruction, and templates with named fields (`{text}`, `{question}`,
`{source_lang}`, ...) for each way of prompting:

- **chat**: a decoder whose tokenizer has a chat template (an instruct model). The system prompt (when given) is
  the system turn, the instruction and input the user turn, and the target the assistant turn, rendered by the
  tokenizer's own template. The model learns to end its turn: the target is followed by the token that closes the
  template's assistant turn (Llama-3's `<|eot_id|>`, Qwen's `<|im_end|>`, ...), found by rendering a turn, and
  generation stops on it;
- **plain**: any other decoder. One text: the instruction, the input, an answer cue (`Summary:`); the target follows
  after a space and ends with EOS;
- **seq2seq**: an encoder-decoder reads the prompt in its encoder: T5-family models their task prefix
  (`summarize: ...`), which they were trained with, others the plain input.

`--prompt-template` (a string, or a file holding it) replaces the template (the user turn in chat mode, the whole
prompt otherwise), `--system-prompt` adds a system turn (or a first paragraph), `--chat-template auto|on|off`
chooses. A few-shot prompt puts K solved examples before the query: earlier user/assistant turns in chat mode,
earlier blocks otherwise.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ftctl.errors import FtctlError

CHAT_CHOICES = ("auto", "on", "off")
BODY = "\u2063BODY\u2063"  # stands in for the field shortened when a prompt is too long (invisible separators)
PROBE = "\u2063ANSWER\u2063"  # an assistant turn's content, to find what the template puts after it


@dataclass(frozen=True)
class PromptSpec:
    """What a task says about its prompts. Templates may name `{instruction}` and the task's `fields`."""

    instruction: str  # default instruction (may itself name fields, e.g. `{labels}`)
    chat: str  # the user turn
    plain: str  # the whole prompt for a decoder without a chat template; the answer follows it
    seq2seq: str  # an encoder-decoder's input: the T5 task prefix
    seq2seq_plain: str  # other encoder-decoders (BART)
    fields: tuple[str, ...]  # the fields the task's examples give
    body: str  # the field shortened when a prompt does not fit


@dataclass(frozen=True)
class Shot:
    """A solved example shown before the query (few-shot)."""

    fields: dict[str, str]
    target: str


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def read_template(value: str | None) -> str | None:
    """`--prompt-template`: a file's content when it names a file, else the string itself."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8").rstrip("\n")
    return value


META_FIELDS = ("labels", "task")  # fields that describe the task, not the example


def check_template(template: str, spec: PromptSpec, flag: str = "--prompt-template") -> None:
    allowed = ("instruction", *spec.fields)
    try:
        names = template_fields(template)
    except ValueError as exc:
        raise FtctlError(
            f"{flag}: not a valid template ({exc}); write fields as {{name}}, braces as {{{{ }}}}"
        ) from None
    for name in names:
        if name not in allowed:
            raise FtctlError(
                f"{flag}: this task's prompts have no field '{{{name}}}'; fields: "
                + ", ".join(f"{{{f}}}" for f in allowed)
            )
        if name == "":
            raise FtctlError(f"{flag}: a field without a name ({{}}); name it, e.g. {{{spec.fields[0]}}}")
    inputs = [f for f in spec.fields if f not in META_FIELDS]
    if not set(names) & set(inputs):
        raise FtctlError(
            f"{flag} holds none of the example's fields ({', '.join(f'{{{f}}}' for f in inputs)}): every prompt "
            "would be the same text and the model would never see the input; add one, e.g. {" + spec.fields[0] + "}"
        )


class PromptFormat:
    """A task's prompts for one model: its mode (chat, plain, seq2seq), template and system prompt."""

    def __init__(
        self,
        spec: PromptSpec,
        tokenizer: PreTrainedTokenizerBase,
        *,
        decoder: bool,
        t5_style: bool,
        chat: str = "auto",
        template: str | None = None,
        system: str | None = None,
        instruction: str | None = None,
    ):
        self.spec, self.tokenizer = spec, tokenizer
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if chat == "on" and not (decoder and has_chat):
            what = "an encoder-decoder" if not decoder else "a decoder whose tokenizer has no chat template"
            raise FtctlError(
                f"--chat-template on: the model is {what}; use --chat-template off (or auto), or an instruct model "
                "whose tokenizer carries a chat template"
            )
        self.mode = "chat" if decoder and has_chat and chat != "off" else "plain" if decoder else "seq2seq"
        default = {"chat": spec.chat, "plain": spec.plain}.get(self.mode)
        if default is None:
            default = spec.seq2seq if t5_style else spec.seq2seq_plain
        self.template = template if template is not None else default
        check_template(self.template, spec)
        self.system = system
        self.instruction = instruction if instruction is not None else spec.instruction
        self._system_turn = self._accepts_system() if self.mode == "chat" and system else False

    def _accepts_system(self) -> bool:
        """Some templates refuse a system turn (Gemma): the system prompt then opens the user turn."""
        try:
            self.tokenizer.apply_chat_template(
                [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:  # jinja2's TemplateError, raised by the template's own raise_exception
            return False
        return True

    def user_text(self, fields: dict[str, str]) -> str:
        values = {**fields, "instruction": self.instruction.format(**fields)}
        return self.template.format(**values)

    def _messages(self, user: str, shots: tuple[Shot, ...]) -> list[dict[str, str]]:
        messages = []
        for shot in shots:
            messages += [
                {"role": "user", "content": self.user_text(shot.fields)},
                {"role": "assistant", "content": shot.target},
            ]
        messages.append({"role": "user", "content": user})
        if self.system:
            if self._system_turn:
                messages.insert(0, {"role": "system", "content": self.system})
            else:
                messages[0] = {"role": "user", "content": f"{self.system}\n\n{messages[0]['content']}"}
        return messages

    def render(self, fields: dict[str, str], shots: tuple[Shot, ...] = ()) -> tuple[str, str, str]:
        """(head, body, tail): the prompt text, the body field apart so that only it is shortened when needed."""
        body = str(fields.get(self.spec.body, ""))
        user = self.user_text({**fields, self.spec.body: BODY})
        if self.mode == "chat":
            text = self.tokenizer.apply_chat_template(
                self._messages(user, shots), tokenize=False, add_generation_prompt=True
            )
        else:
            blocks = []
            for shot in shots:
                question = self.user_text(shot.fields)
                blocks.append(question + self.answer_space(question) + shot.target)
            text = "\n\n".join([*([self.system] if self.system else []), *blocks, user])
        if BODY not in text:  # a template without the body field
            return text, "", ""
        head, tail = text.split(BODY, 1)
        return head, body, tail.replace(BODY, body)

    @staticmethod
    def answer_space(prompt: str) -> str:
        """Plain prompts: the answer follows after a space unless the prompt ends in whitespace."""
        return "" if not prompt or prompt[-1].isspace() else " "

    def answer(self, prompt: str, target: str) -> str:
        """A decoder's target text as it follows `prompt`: after a space in plain prompts (see `answer_space`); a
        chat template's assistant turn starts it afresh."""
        return (self.answer_space(prompt) if self.mode == "plain" else "") + target

    def end_of_turn(self) -> int | None:
        """The token that ends an assistant turn (chat mode): the first special token the template writes after the
        turn's content. None in the other modes (they end with EOS)."""
        if self.mode != "chat":
            return None
        tok = self.tokenizer
        text = tok.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": PROBE}], tokenize=False
        )
        after = text.split(PROBE, 1)[1] if PROBE in text else ""
        special = set(tok.all_special_ids) | {i for i in tok.added_tokens_decoder}
        for token in tok(after, add_special_tokens=False)["input_ids"]:
            if token in special:
                return int(token)
        return tok.eos_token_id

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "template": self.template,
            "instruction": self.instruction,
            "system_prompt": self.system,
            "system_turn": self._system_turn if self.system else None,
        }
