"""Multi-turn chats on templates without {% generation %} blocks: ChatML gets them added, the
smoke model's template has them, model.chat_template replaces a tokenizer's template, and
anything else is still refused. Tokenizers only, built offline: nothing trains."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from tasks import encoding, templates
from tasks.config import TokenizeConfig, parse_params
from tasks.errors import ConfigError, PipelineError, TemplateError
from tasks.smoke_model import CHAT_TEMPLATE, build_tokenizer

from .conftest import REPO, mask_spans

# SmolLM2-135M-Instruct's chat template, as its tokenizer_config.json holds it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")
# The unmarked template the smoke model had before: no {% generation %}, not ChatML.
PLAIN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

CHAT = [{"role": "user", "content": "What is DVC?"},
        {"role": "assistant", "content": "Version control for data and models."},
        {"role": "user", "content": "And Prefect?"},
        {"role": "assistant", "content": "A workflow orchestrator."},
        {"role": "user", "content": "And Arrow?"},
        {"role": "assistant", "content": "A columnar memory format."}]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def smoke_tok():
    texts = [m["content"] for m in CHAT] * 3 + ["You are a helpful AI assistant named SmolLM"]
    return build_tokenizer(texts, vocab_size=300)


def chatml(smoke_tok, template: str = SMOLLM2_TEMPLATE, eos: str | None = "<|im_end|>"):
    """The smoke tokenizer with ChatML's special tokens and `template`; EOS <|im_end|> as in
    SmolLM2-Instruct, or (eos=None) the smoke model's </s>, as a base model's <|endoftext|>."""
    tok = copy.deepcopy(smoke_tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if eos is not None:
        tok.eos_token = eos
    tok.chat_template = template
    return tok


def test_chatml_template_gets_markers_on_every_answer_and_its_im_end(smoke_tok):
    tok = chatml(smoke_tok)
    assert not templates.GENERATION_TAG.search(tok.chat_template)
    assert templates.marks_assistant_turns(tok)
    ids, mask = encoding.chat_ids(tok, CHAT, "r")
    # Each answer and the <|im_end|> that ends its turn; no role header, no user or system token.
    assert mask_spans(tok, ids, mask) == [a + "<|im_end|>" for a in ANSWERS]
    # The markers change nothing that is rendered, and the tokenizer keeps its own template.
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.chat_template == SMOLLM2_TEMPLATE
    assert templates.GENERATION_TAG.search(templates.marked_chat_template(tok))
    assert templates.marked_chat_template(smoke_tok) == smoke_tok.chat_template  # marked already
    e = encoding.encode_chat(ids, mask, templates.end_of_turn_ids(tok), tok.bos_token_id,
                             TokenizeConfig(max_length=512))
    assert e["eos_in_labels"] and e["trainable"] == sum(mask)
    prompt, completion = templates.render_chat(CHAT, tok, "r")
    assert prompt.endswith("<|im_start|>user\nAnd Arrow?<|im_end|>\n<|im_start|>assistant\n")
    assert completion == ANSWERS[-1]


def test_chatml_end_of_turn_counts_when_eos_is_another_token(smoke_tok):
    """A base model's ChatML template (EOS <|endoftext|>, here </s>): <|im_end|> ends a turn, and
    generation stops at either."""
    tok = chatml(smoke_tok, eos=None)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "</s>" and im_end != tok.eos_token_id
    assert templates.end_of_turn_ids(tok) == [tok.eos_token_id, im_end]
    assert templates.stop_token_ids(tok) == [tok.eos_token_id, im_end]
    ids, mask = encoding.chat_ids(tok, CHAT, "r")
    assert mask_spans(tok, ids, mask) == [a + "<|im_end|>" for a in ANSWERS]
    e = encoding.encode_chat(ids, mask, templates.end_of_turn_ids(tok), tok.bos_token_id,
                             TokenizeConfig(max_length=512))
    assert e["eos_in_labels"]
    # Not ChatML: EOS alone, as before.
    assert templates.end_of_turn_ids(smoke_tok) == [smoke_tok.eos_token_id]
    assert templates.stop_token_ids(smoke_tok) == smoke_tok.eos_token_id


@pytest.mark.parametrize("expression", [
    # Qwen2's: attribute access, whitespace control
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "{{ \"<|im_start|>\" + message[\"role\"] + \"\\n\" + message[\"content\"] + \"<|im_end|>\\n\" -}}",
    "{{'<|im_start|>'+message['role']+'\\n'+message['content'] | trim+'<|im_end|>'+'\\n'}}",
    # SmolLM2's as its GGUF file stores it: newlines inside the quotes, not \n escapes
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
])
def test_chatml_message_expressions_that_are_recognised(smoke_tok, expression):
    template = ("{%- for message in messages %}\n    " + expression + "\n{%- endfor %}\n"
                "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    tok = chatml(smoke_tok, template)
    marked = templates.marked_chat_template(tok)
    assert marked is not None and marked.count("{% generation %}") == 1
    ids, mask = encoding.chat_ids(tok, CHAT, "r")
    assert mask_spans(tok, ids, mask) == [a + "<|im_end|>" for a in ANSWERS]
    for prompt in (False, True):
        assert tok.apply_chat_template(CHAT, chat_template=marked, tokenize=False, add_generation_prompt=prompt) \
            == tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)


@pytest.mark.parametrize("template", [
    PLAIN_TEMPLATE,
    # ChatML text written another way than the one expression recognised: not rewritten.
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | upper + '<|im_end|>\\n' }}"
    "{% endfor %}",
])
def test_unrecognised_template_is_still_refused_naming_the_fix(smoke_tok, template):
    tok = chatml(smoke_tok, template)
    assert not templates.marks_assistant_turns(tok)
    with pytest.raises(TemplateError) as err:
        encoding.chat_ids(tok, CHAT, "prepared row 'c1'")
    message = str(err.value)
    for needle in ("prepared row 'c1'", "3 assistant turns", "has no {% generation %} block",
                   "model.chat_template", "prompt.template: chat", "one assistant turn per conversation"):
        assert needle in message, needle


def test_smoke_template_marks_every_turn_ending_with_eos(smoke_tok):
    assert smoke_tok.chat_template == CHAT_TEMPLATE and templates.marks_assistant_turns(smoke_tok)
    ids, mask = encoding.chat_ids(smoke_tok, CHAT, "r")
    assert mask_spans(smoke_tok, ids, mask) == [a + "</s>" for a in ANSWERS]
    assert smoke_tok.decode(ids) == "".join(
        f"<|{m['role']}|>\n{m['content']}{'</s>' if m['role'] == 'assistant' else ''}\n" for m in CHAT)
    # A one-turn chat's prompt is as it was; the answer + EOS is what the pair trains.
    assert templates.render_chat(CHAT[:2], smoke_tok, "r") == ("<|user|>\nWhat is DVC?\n<|assistant|>\n", ANSWERS[0])
    # The committed smoke model's tokenizer has the same template.
    assert (REPO / "models/smoke-llama/chat_template.jinja").read_text() == CHAT_TEMPLATE


# ---- model.chat_template ----

def _params(root: Path, chat_template: str | None):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["chat_template"] = chat_template
    return parse_params(raw, "params.yaml")


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    """A checkout with the smoke model under models/ (the tokenizer alone is what loads)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "models/smoke-llama", tmp_path / "models/smoke-llama")
    return tmp_path / "models"


def test_model_chat_template_replaces_the_tokenizers(models):
    from tasks.modeling import load_tokenizer

    (models / "chatml.jinja").write_text(SMOLLM2_TEMPLATE)
    params = _params(models.parent, "models/chatml.jinja")
    assert params.model.chat_template == "models/chatml.jinja"
    tok = load_tokenizer(params.model)
    assert tok.chat_template == SMOLLM2_TEMPLATE
    # The pipeline's own copy (what tokenize saves, train copies into the adapter) carries it.
    tok.save_pretrained(models / "copy")
    assert load_tokenizer(params.model, str(models / "copy")).chat_template == SMOLLM2_TEMPLATE
    assert load_tokenizer(_params(models.parent, None).model).chat_template == CHAT_TEMPLATE


def test_model_chat_template_the_pipeline_cannot_mark_is_named_in_the_refusal(models):
    from tasks.modeling import load_tokenizer

    (models / "plain.jinja").write_text(PLAIN_TEMPLATE)
    tok = load_tokenizer(_params(models.parent, "models/plain.jinja").model)
    with pytest.raises(TemplateError, match=r"chat template of model\.chat_template \(models/plain\.jinja\) "
                                            r"has no \{% generation %\} block"):
        encoding.chat_ids(tok, CHAT, "r")


def test_model_chat_template_that_is_not_jinja_stops_naming_file_and_line(models):
    from tasks.modeling import load_tokenizer

    (models / "bad.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(PipelineError, match=r"model\.chat_template: models/bad\.jinja line 2 is not a valid Jinja"):
        load_tokenizer(_params(models.parent, "models/bad.jinja").model)


@pytest.mark.parametrize(("value", "needle"), [
    ("models/missing.jinja", "model.chat_template: models/missing.jinja does not exist: name a Jinja chat "
                             "template file under models/"),
    ("models", "model.chat_template: models is a folder, not a file"),
    ("chat_template.jinja", "model.chat_template: a chat template file must be under models/"),
    ("/etc/hostname", "model.chat_template: a chat template file must be under models/"),
    ("models/../chat.jinja", "model.chat_template: a chat template file must be under models/"),
])
def test_model_chat_template_must_be_a_file_under_models(models, value, needle):
    (models.parent / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE)  # exists, but outside models/
    with pytest.raises(ConfigError) as err:
        _params(models.parent, value)
    assert needle in str(err.value)
    assert str(err.value).count("model.chat_template") == 1
