"""Prompt templates: built-in recipes and user strings with `{field}` placeholders.

A template renders one record into a (prompt, completion) pair; the loss is later put on
the completion only. A chat is also trained as its whole conversation, every assistant turn
as the chat template's {% generation %} blocks mark it (assistant_mask); a ChatML template
without them gets them added (marked_chat_template). Placeholders are
plain field names and nothing else: no attribute access, indexing, format specs or
expressions, so a template can never run code.
`{{` and `}}` stand for literal braces.
"""

from __future__ import annotations

import functools
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
    return list(_parse(text))


# Templates parsed and kept: prepare renders every row through the same few (parsing them
# anew cost a tenth of its time); a run uses a handful, a custom template per source at most.
PARSED_TEMPLATES = 64


@functools.lru_cache(maxsize=PARSED_TEMPLATES)
def _parse(text: str) -> tuple[str | tuple[str], ...]:
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
    return tuple(parts)


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

# ChatML: every message is `<|im_start|>{role}\n{content}<|im_end|>\n`, and <|im_end|> ends a
# turn (SmolLM2's and Qwen's instruct models; it is their EOS, but base models' EOS is often
# <|endoftext|>).
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
_STR = r"""(?:'{0}'|"{0}")"""
_NEWLINE = _STR.format(r"(?:\\n|\n)")  # written as \n, or as a newline inside the quotes (GGUF files do)
_FIELD = r"""(?:\[\s*(?:'{0}'|"{0}")\s*\]|\.{0})"""
# The one expression ChatML templates render a message with, as SmolLM2's and Qwen2's write it:
# {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
# (also message.role / message["role"], any loop variable, '<|im_end|>\n' as one string, a
# `| trim` on the content, and -}} / {{- whitespace control). Nothing looser is recognised.
CHATML_MESSAGE = re.compile(
    r"(?P<open>\{\{-?)\s*" + _STR.format(re.escape(CHATML_START)) + r"\s*\+\s*"
    r"(?P<role>(?P<var>[A-Za-z_]\w*)\s*" + _FIELD.format("role") + r")\s*\+\s*" + _NEWLINE + r"\s*\+\s*"
    r"(?P<content>(?P=var)\s*" + _FIELD.format("content") + r"(?:\s*\|\s*trim)?)\s*\+\s*"
    r"(?:" + _STR.format(re.escape(CHATML_END)) + r"\s*\+\s*" + _NEWLINE + "|"
    + _STR.format(re.escape(CHATML_END) + r"(?:\\n|\n)") + r")\s*(?P<close>-?\}\})")
# A conversation that exercises every branch a ChatML rewrite touches: rendered with and
# without the inserted markers, it must give the same text.
_PROBE = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
          {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]
# Chat template -> the same template with generation markers (None: cannot add them).
_marked: dict[str, str | None] = {}


def assistant_turns(messages: list[dict[str, Any]]) -> int:
    return sum(m["role"] == "assistant" for m in messages)


def _chat_template(tokenizer: Any) -> str | None:
    try:
        return tokenizer.get_chat_template()
    except ValueError:  # no chat template at all
        return None


def is_chatml(template: str | None) -> bool:
    return template is not None and CHATML_START in template and CHATML_END in template


def add_chatml_markers(template: str) -> str | None:
    """`template` with each ChatML message expression rewritten so that an assistant
    message's content and its <|im_end|> render inside {% generation %}...{% endgeneration %};
    the role header and the newline after <|im_end|> stay context. None when the template has
    no such expression. Other messages render through the original expression, and the
    rewrite opens and closes with the original's tags, so whitespace control around it acts as
    before."""
    def rewrite(m: re.Match[str]) -> str:
        role, content = m["role"], m["content"]
        header = f"{m['open']} '{CHATML_START}' + {role} + '\\n' }}}}"
        body = f"{{{{ {content} + '{CHATML_END}' }}}}"
        return (f"{header}{{% if {role} == 'assistant' %}}{{% generation %}}{body}{{% endgeneration %}}"
                f"{{% else %}}{body}{{% endif %}}{{{{ '\\n' {m['close']}")

    if not is_chatml(template) or GENERATION_TAG.search(template):
        return None
    marked, count = CHATML_MESSAGE.subn(rewrite, template)
    return marked if count else None


def marked_chat_template(tokenizer: Any) -> str | None:
    """The chat template that marks assistant turns: the tokenizer's own when it has
    {% generation %} blocks, else for a recognised ChatML template that template with markers
    added (add_chatml_markers), checked to render exactly as the original does; None when
    neither."""
    template = _chat_template(tokenizer)
    if template is None:
        return None
    if GENERATION_TAG.search(template):
        return template
    if template not in _marked:
        _marked[template] = _checked_markers(template, tokenizer)
    return _marked[template]


def _checked_markers(template: str, tokenizer: Any) -> str | None:
    import jinja2

    marked = add_chatml_markers(template)
    if marked is None:
        return None
    try:
        for prompt in (False, True):
            same = [tokenizer.apply_chat_template(_PROBE, chat_template=t, tokenize=False,
                                                  add_generation_prompt=prompt) for t in (template, marked)]
            if same[0] != same[1]:
                return None
    except (jinja2.TemplateError, ValueError, TypeError):
        return None
    return marked


def marks_assistant_turns(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template wraps assistant messages in {% generation %},
    or is a ChatML template that the pipeline gives such blocks (marked_chat_template)."""
    return marked_chat_template(tokenizer) is not None


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The tokens that end an assistant turn: EOS, and a ChatML template's <|im_end|> when it
    is a token of its own (the EOS of instruct models; base models' EOS is often another)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if is_chatml(_chat_template(tokenizer)):
        end = tokenizer.convert_tokens_to_ids(CHATML_END)
        if isinstance(end, int) and tokenizer.convert_ids_to_tokens(end) == CHATML_END and end not in ids:
            ids.append(end)
    return ids


def stop_token_ids(tokenizer: Any) -> int | list[int]:
    """What generation stops at (generate's eos_token_id): EOS, or a list with a ChatML
    template's <|im_end|> when that is another token."""
    ids = end_of_turn_ids(tokenizer)
    return ids if len(ids) > 1 else tokenizer.eos_token_id


# The attribute load_tokenizer sets to model.chat_template's file when it replaced the template.
TEMPLATE_SOURCE = "finetune_chat_template_path"


def _template_source(tokenizer: Any) -> str:
    path = getattr(tokenizer, TEMPLATE_SOURCE, None)
    return f"model.chat_template ({path})" if path else f"model.name_or_path ({tokenizer.name_or_path})"


def _unmarked(where: str, problem: str) -> TemplateError:
    return TemplateError(
        f"{where}: {problem}, so prompt.template: chat cannot train every assistant turn. Set "
        "model.chat_template to a Jinja file under models/ whose template wraps each assistant "
        "message and its end-of-turn token in {% generation %}...{% endgeneration %}, or keep one "
        "assistant turn per conversation (the last), or use a text template")


def assistant_mask(messages: list[dict[str, Any]], tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    """The whole conversation through the chat template: (token ids, 1 on each assistant
    turn's tokens as the template's {% generation %} blocks mark them, else 0). A ChatML
    template without blocks gets them (marked_chat_template).

    Raises TemplateError when the template cannot mark every assistant turn, or its marked
    turns leave out the end-of-turn token (EOS, or ChatML's <|im_end|>): the model would never
    learn to end a turn."""
    import jinja2

    turns = assistant_turns(messages)
    template = marked_chat_template(tokenizer)
    if template is None:
        raise _unmarked(where, f"the conversation has {turns} assistant turns, but the chat template "
                        f"of {_template_source(tokenizer)} has no {{% generation %}} block to mark "
                        "them (the pipeline adds them only to ChatML templates it recognises)")
    try:
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
    except (jinja2.TemplateError, ValueError) as err:
        raise TemplateError(f"{where}: the chat template cannot render this conversation: {err}") from None
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    marked = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    if marked < turns:
        raise _unmarked(where, f"the chat template of {_template_source(tokenizer)} marks {marked} of "
                        f"the conversation's {turns} assistant turns")
    ends = end_of_turn_ids(tokenizer)
    if not any(m and t in ends for t, m in zip(ids, mask, strict=True)):
        names = " or ChatML's ".join(repr(tokenizer.convert_ids_to_tokens(t)) for t in ends)
        raise TemplateError(
            f"{where}: the chat template of {_template_source(tokenizer)} ends no assistant turn "
            f"with EOS {names} inside its {{% generation %}} block, so the model would never learn "
            "to end a turn: move the end-of-turn token inside {% generation %}...{% endgeneration %}, "
            "or make it the tokenizer's EOS token")
    return ids, mask
