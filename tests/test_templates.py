"""Prompt templates: built-ins, user strings, chat templates, and the sandbox."""

import pytest

from tasks import templates
from tasks.errors import TemplateError
from tasks.smoke_model import build_tokenizer


def test_dialogue_summary_builtin():
    tpl = templates.BUILTIN_TEMPLATES["dialogue_summary"]
    prompt, completion = templates.render(tpl, {"dialogue": "A: hi\nB: hey", "summary": "They greet."}, "r1")
    assert prompt == "Summarize the following conversation.\n\nA: hi\nB: hey\n\nSummary:"
    assert completion == " They greet."


def test_instruction_builtin_drops_empty_input():
    tpl = templates.BUILTIN_TEMPLATES["instruction"]
    with_input, _ = templates.render(tpl, {"instruction": "Add", "input": "1 2", "response": "3"}, "r")
    without, completion = templates.render(tpl, {"instruction": "Add", "input": "", "response": "3"}, "r")
    assert "### Input:\n1 2" in with_input and "### Input" not in without
    assert without.endswith("### Instruction:\nAdd\n\n### Response:\n") and completion == "3"


def test_question_answer_builtin():
    prompt, completion = templates.render(templates.BUILTIN_TEMPLATES["question_answer"],
                                          {"question": "2+2?", "answer": "4"}, "r")
    assert prompt == "Please answer the following question.\nQ: 2+2?\nA:" and completion == " 4"


def test_user_template_with_literal_braces():
    tpl = templates.resolve("Fill {{x}}: {text}\n", "{label}")
    assert templates.render(tpl, {"text": "t", "label": "l"}, "r") == ("Fill {x}: t\n", "l")


def test_missing_field_names_record_and_field():
    tpl = templates.resolve("Q: {question}", " {answer}")
    with pytest.raises(TemplateError, match=r"line 7: missing field 'answer'"):
        templates.render(tpl, {"question": "q"}, "data/raw/x.jsonl line 7")


def test_non_text_field_is_refused():
    with pytest.raises(TemplateError, match="field 'q' is list, expected text"):
        templates.fill("{q}", {"q": ["a"]}, "r")


@pytest.mark.parametrize("bad", [
    "{{ ''.__class__.__mro__ }}", "{q.__class__}", "{q[0]}", "{q!r}", "{q:>10}", "{0}",
    "{__import__}", "{ q }", "}", "{unclosed",
])
def test_unsafe_or_malformed_templates_are_refused(bad):
    with pytest.raises(TemplateError):
        templates.parse(bad)


def test_chat_template_uses_tokenizer():
    tok = build_tokenizer(["hello there", "general kenobi"], vocab_size=300)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    prompt, completion = templates.render_chat(messages, tok, "r")
    assert prompt == "<|user|>\nhi\n<|assistant|>\n" and completion == "hello"
    with pytest.raises(TemplateError, match="last message must be the assistant's"):
        templates.render_chat(messages[:1], tok, "r")


def test_generation_markers_are_found_in_the_chat_template():
    tok = build_tokenizer(["hello there", "general kenobi"], vocab_size=300)
    assert templates.marks_assistant_turns(tok)  # the smoke model's template marks its answers
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert not templates.marks_assistant_turns(tok)
    for tag in ("{% generation %}", "{%- generation -%}", "{%generation%}"):
        tok.chat_template = "{% for m in messages %}" + tag + "{{ m['content'] }}{% endgeneration %}{% endfor %}"
        assert templates.marks_assistant_turns(tok), tag
    tok.chat_template = None
    assert not templates.marks_assistant_turns(tok)
