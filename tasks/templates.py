"""Prompt templates: built-in recipes and user strings with `{field}` placeholders.

A template renders one record into a (prompt, completion) pair; the loss is later put on
the completion only. A chat is also trained as its whole conversation, every assistant turn
as the chat template's {% generation %} blocks mark it (assistant_mask). Placeholders are
plain field names and nothing else: no attribute access, indexing, format specs or
expressions, so a template can never run code.
`{{` and `}}` stand for literal braces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import TemplateError

CHAT = "chat"  # the tokenizer's own chat template over a list of messages
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DUNDER = re.compile(r"__\w+__")


@dataclass(frozen=True)
class Template:
    prompt: str
    completion: str
    # Field -> prompt used instead when that field is empty (an instruction without input).
    prompt_when_empty: Mapping[str, str] = field(default_factory=dict)


BUILTIN_TEMPLATES: dict[str, Template] = {
    "dialogue_summary": Template(
        prompt="Summarize the following conversation.\n\n{dialogue}\n\nSummary:",
        completion=" {summary}",
    ),
    "instruction": Template(
        prompt=("Below is an instruction that describes a task, paired with an input that "
                "provides further context. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
        completion="{response}",
        prompt_when_empty={"input": (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")},
    ),
    "question_answer": Template(
        prompt="Please answer the following question.\nQ: {question}\nA:",
        completion=" {answer}",
    ),
    # For model.task sequence_classification: the text is the input, the label the class.
    "text_classification": Template(prompt="{text}", completion="{label}"),
}
TEMPLATE_NAMES = [*BUILTIN_TEMPLATES, CHAT]


def parse(text: str) -> list[str | tuple[str]]:
    """Split a template into literal strings and 1-tuples of field names.

    Raises TemplateError for anything but `{name}`, `{{` and `}}`.
    """
    if m := _DUNDER.search(text):
        raise TemplateError(f"template refers to {m.group()!r}: Python internals are not allowed "
                            "in templates")
    parts: list[str | tuple[str]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith("{{", i) or text.startswith("}}", i):
            literal.append(ch)
            i += 2
        elif ch == "{":
            end = text.find("}", i)
            name = text[i + 1:end] if end != -1 else None
            if name is None or not _NAME.match(name):
                shown = text[i:end + 1] if end != -1 else text[i:i + 20]
                raise TemplateError(
                    f"bad placeholder {shown!r} at character {i}: use a plain field name like "
                    "{dialogue} (no attributes, indexing or format specs); write {{ or }} for a "
                    "literal brace")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append((name,))
            i = end + 1
        elif ch == "}":
            raise TemplateError(f"unmatched '}}' at character {i}: write }}}} for a literal brace")
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    return parts


def fields_of(text: str) -> list[str]:
    return [p[0] for p in parse(text) if isinstance(p, tuple)]


def fill(text: str, values: Mapping[str, Any], where: str) -> str:
    """Substitute field values into a template string; `where` names the record in errors."""
    out = []
    for part in parse(text):
        if isinstance(part, str):
            out.append(part)
            continue
        name = part[0]
        if name not in values or values[name] is None:
            raise TemplateError(f"{where}: missing field {name!r} needed by the template")
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TemplateError(f"{where}: field {name!r} is {type(value).__name__}, expected text")
        out.append(str(value))
    return "".join(out)


def resolve(template: str, completion: str | None) -> Template:
    """A built-in by name, or a user template (whose completion template is required)."""
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if completion is None:
        raise TemplateError("a custom prompt.template needs prompt.completion as well")
    return Template(prompt=template, completion=completion)


def render_prompt(tpl: Template, values: Mapping[str, Any], where: str) -> str:
    prompt = tpl.prompt
    for name, alternative in tpl.prompt_when_empty.items():
        if not values.get(name):
            prompt = alternative
    return fill(prompt, values, where)


def prompt_fields(tpl: Template) -> list[str]:
    """The fields a prompt (and its alternatives) reads: what new data must carry."""
    return list(dict.fromkeys(fields_of(tpl.prompt + "".join(tpl.prompt_when_empty.values()))))


def render(tpl: Template, values: Mapping[str, Any], where: str) -> tuple[str, str]:
    return render_prompt(tpl, values, where), fill(tpl.completion, values, where)


def render_chat(messages: Any, tokenizer: Any, where: str) -> tuple[str, str]:
    """Prompt = the chat template over all but the last message (which must be the
    assistant's), ending with the generation prompt; completion = that last message."""
    if not isinstance(messages, list) or not messages:
        raise TemplateError(f"{where}: 'messages' must be a non-empty list of "
                            "{role, content} objects")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise TemplateError(f"{where}: every message needs string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise TemplateError(f"{where}: the last message must be the assistant's (it is the "
                            "completion the model learns)")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False,
                                           add_generation_prompt=True)
    return prompt, messages[-1]["content"]


# What transformers looks for before it can mask assistant tokens (chat_template_utils).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def assistant_turns(messages: list[dict[str, Any]]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def marks_assistant_turns(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template wraps assistant messages in {% generation %}."""
    try:
        return bool(GENERATION_TAG.search(tokenizer.get_chat_template()))
    except ValueError:  # no chat template at all
        return False


def _unmarked(where: str, problem: str) -> TemplateError:
    return TemplateError(
        f"{where}: {problem}, so prompt.template: chat cannot train every assistant turn. Give the "
        "tokenizer a chat template that wraps each assistant message and its end-of-turn token in "
        "{% generation %}...{% endgeneration %} (edit chat_template.jinja in a local copy of the "
        "model under models/), or keep one assistant turn per conversation (the last), or use a "
        "text template")


def assistant_mask(messages: list[dict[str, Any]], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """The whole conversation through the chat template: (token ids, 1 on each assistant
    turn's tokens as the template's {% generation %} blocks mark them, else 0).

    Raises TemplateError when the template cannot mark every assistant turn, or its marked
    turns leave out EOS (the model would never learn to end a turn)."""
    import jinja2

    turns = assistant_turns(messages)
    if not marks_assistant_turns(tokenizer):
        raise _unmarked(where, f"the conversation has {turns} assistant turns, but the chat template "
                        f"of model.name_or_path ({tokenizer.name_or_path}) has no {{% generation %}} "
                        "block to mark them")
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    except (jinja2.TemplateError, ValueError) as err:
        raise TemplateError(f"{where}: the chat template cannot render this conversation: {err}") from None
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    marked = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    if marked < turns:
        raise _unmarked(where, f"the chat template of model.name_or_path ({tokenizer.name_or_path}) "
                        f"marks {marked} of the conversation's {turns} assistant turns")
    eos = tokenizer.eos_token_id
    if not any(m and t == eos for t, m in zip(ids, mask, strict=True)):
        raise TemplateError(
            f"{where}: the chat template of model.name_or_path ({tokenizer.name_or_path}) ends no "
            f"assistant turn with EOS {tokenizer.eos_token!r} inside its {{% generation %}} block, so "
            "the model would never learn to end a turn: move the end-of-turn token inside "
            "{% generation %}...{% endgeneration %}, or make it the tokenizer's EOS token")
    return ids, mask
