"""Chat and instruction data: rows of `messages`, or of `prompt` and `completion`.

A row is one of (both may mix in a file):

- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`: the
  last message is the assistant's reply, the completion; the messages before it are the
  prompt. Both are rendered with the tokenizer's chat template (`chat_template: auto`, the
  default, or `tokenizer`, which refuses a tokenizer without one): the prompt with the
  generation prompt added, the completion as what the whole conversation adds to it (the
  reply and its end-of-turn marker). A tokenizer without a chat template (the tiny test
  models) under `auto`, or `chat_template: plain`, reads the plain template, logged once:

      system: You are terse.
      user: Capital of France?
      assistant: Paris

  that is `"<role>: <content>\\n"` per message of the prompt, then `"assistant:"`; the
  completion is `" <content>\\n"`.
- `{"prompt": "...", "completion": "..."}`: plain text, the completion appended to the
  prompt exactly as written (the prompt-completion form of TRL's datasets); no template.

The task is a generation task: it trains by teacher forcing on the completion's tokens
only (the prompt's are masked out of the loss, `tasks.losses.teacher_forcing_loss`), and
is evaluated by generation: greedy decoding after the prompt, stopped at EOS (an
end-of-turn token where it is the tokenizer's EOS) or a newline, scored by SQuAD-style
F1 and exact match against the completion's text (`metric`, `squad_f1` by default).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tasks.base import Example, TaskError, check_choice
from tasks.files import FileTask, split_files
from tasks.metrics import check_metric
from tasks.registry import register_task

logger = logging.getLogger(__name__)
_logged: set[str] = set()

CHAT_TEMPLATES = ("auto", "tokenizer", "plain")
"""How `messages` rows are rendered: the tokenizer's chat template where it has one, else
the plain template (auto); the tokenizer's, an error without one; the plain one."""

ROLES = ("system", "user", "assistant", "tool")

Message = Mapping[str, str]


def plain_prompt(history: Sequence[Message]) -> str:
    """The plain template's prompt: each message on its line, then the reply's role."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant:"


def plain_completion(reply: str) -> str:
    return f" {reply}\n"


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A row's `messages`, checked: {role, content} objects, the last the assistant's."""
    if isinstance(value, str):  # a CSV cell holds the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise TaskError(f"{where}: messages is not valid JSON ({error.msg})") from None
    if not isinstance(value, list) or len(value) < 2:
        raise TaskError(
            f"{where}: messages must be a list of at least two {{role, content}} objects "
            "(the prompt, then the assistant's reply)"
        )
    for i, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("content"), str)
            or message.get("role") not in ROLES
        ):
            raise TaskError(
                f"{where}: message {i} must be {{role, content}} with a role among {list(ROLES)} "
                f"and text content, got {message!r}"
            )
    if value[-1]["role"] != "assistant" or not value[-1]["content"].strip():
        raise TaskError(
            f"{where}: the last message is the completion trained on, so it must be the "
            f"assistant's and not empty; got role {value[-1]['role']!r}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


@dataclass
class ChatTask(FileTask):
    """Chat or instruction rows over JSONL/CSV files (module doc)."""

    name: str
    data_files: Mapping[str, str | Path]
    chat_template: str = "auto"
    """One of CHAT_TEMPLATES."""
    metric: str = "squad_f1"
    kind: ClassVar[str] = "generation"
    template: ClassVar[str] = ""  # rows carry their own form, no `{field}` template
    _tokenizer: Any = field(default=None, init=False, repr=False, compare=False)
    """The tokenizer whose chat template renders messages; None: the plain template, if
    `chat_template` is plain or the task was bound to a tokenizer (`for_tokenizer`)."""
    _is_bound: bool = field(default=False, init=False, repr=False, compare=False)
    _bound: dict[int, tuple[Any, ChatTask]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        what = f"task {self.name!r}"
        self.chat_template = check_choice(
            f"{what}: chat_template", self.chat_template, CHAT_TEMPLATES
        )
        self.objective = check_choice(f"{what}: objective", self.objective, ("loss", "f1"))
        self.metric = check_metric(self.metric)
        self._check_held_out()

    @property
    def required_fields(self) -> list[str]:
        return []

    @property
    def expected_format(self) -> str:
        return (
            "JSONL or CSV rows with `messages` (a list of {role, content}, the last the "
            "assistant's reply) or `prompt` and `completion`"
        )

    def _example(self, row: dict[str, Any], uid: str, where: str) -> Example:
        if row.get("messages") is not None:
            messages = _messages(row["messages"], where)
            return Example({"messages": messages}, 0, uid, answers=(messages[-1]["content"],))
        prompt, completion = row.get("prompt"), row.get("completion")
        if prompt is None and completion is None:
            present = sorted(k for k, v in row.items() if v is not None)
            raise TaskError(f"{where}: expected {self.expected_format}; the row has {present}")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise TaskError(
                f"{where}: prompt and completion must both be text, the completion not empty; "
                f"got prompt {prompt!r}, completion {completion!r}"
            )
        return Example({"prompt": prompt, "completion": completion}, 0, uid, answers=(completion,))

    # ------------------------------------------------------------------ rendering

    def for_tokenizer(self, tokenizer: Any) -> ChatTask:
        """This task rendering `messages` for `tokenizer` (its chat template, or the plain
        one: module doc); the rows are read once, shared with this task."""
        bound = self._bound.get(id(tokenizer))
        if bound is not None and bound[0] is tokenizer:
            return bound[1]
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template == "tokenizer" and not has_template:
            raise TaskError(
                f"task {self.name!r}: chat_template=tokenizer, but the tokenizer "
                f"({type(tokenizer).__name__}) has no chat template; use chat_template: plain "
                "(the plain template of tasks.chat) or a tokenizer that has one"
            )
        if self.chat_template == "auto" and not has_template:
            message = (
                f"task {self.name!r}: the tokenizer ({type(tokenizer).__name__}) has no chat "
                "template; messages are rendered in the plain template (tasks.chat)"
            )
            if message not in _logged:
                _logged.add(message)
                logger.info(message)
        view = copy.copy(self)  # shares the rows read so far (`_cache`)
        view._tokenizer = tokenizer if has_template and self.chat_template != "plain" else None
        view._is_bound, view._bound = True, {}
        self._bound[id(tokenizer)] = (tokenizer, view)
        return view

    def _rendered(self, messages: Sequence[Message]) -> tuple[str, str]:
        """(prompt, completion) of a conversation, the reply being its last message."""
        history, reply = messages[:-1], messages[-1]["content"]
        tokenizer = self._tokenizer
        if tokenizer is None:
            if self.chat_template != "plain" and not self._is_bound:
                raise TaskError(
                    f"task {self.name!r} renders messages with the tokenizer's chat template: "
                    "use task.for_tokenizer(tokenizer) (or chat_template: plain)"
                )
            return plain_prompt(history), plain_completion(reply)
        prompt = tokenizer.apply_chat_template(
            list(history), tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(list(messages), tokenize=False)
        if not full.startswith(prompt):
            raise TaskError(
                f"task {self.name!r}: the tokenizer's chat template renders the conversation "
                "with another beginning than its prompt, so the reply cannot be told apart; "
                "use chat_template: plain"
            )
        completion = full[len(prompt) :]
        from tasks.encoding import bos_prefix  # torch loads only with a model

        bos = getattr(tokenizer, "bos_token", None)
        if bos and bos_prefix(tokenizer) and prompt.startswith(bos):
            prompt = prompt[len(bos) :]  # the encoding adds BOS itself, as the tokenizer would
        return prompt, completion

    def prompt(self, example: Example) -> str:
        if "messages" in example.fields:
            return self._rendered(example.fields["messages"])[0]
        return example.fields["prompt"]

    def answers(self, example: Example) -> list[str]:
        """The teacher-forcing target: the rendered completion."""
        if "messages" in example.fields:
            return [self._rendered(example.fields["messages"])[1]]
        return [example.fields["completion"]]


@dataclass(frozen=True)
class ChatOptions:
    """Chat (`messages`) or instruction (`prompt` / `completion`) rows from JSONL/CSV files."""

    path: str | Path | Mapping[str, str | Path]
    name: str = "chat"
    chat_template: str = "auto"
    objective: str = "loss"
    metric: str = "squad_f1"
    dev_fraction: float | None = None
    split_seed: int = 0


def chat(options: ChatOptions) -> ChatTask:
    return ChatTask(
        name=options.name,
        data_files=split_files(options.path, hold_out_dev=options.dev_fraction is not None),
        chat_template=options.chat_template,
        objective=options.objective,
        metric=options.metric,
        dev_fraction=options.dev_fraction,
        split_seed=options.split_seed,
    )


register_task("chat", ChatOptions, chat, kinds=("generation",), fixtures=False)
