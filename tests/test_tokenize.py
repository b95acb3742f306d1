"""tokenize: label masking, EOS, truncation accounting, pad token, preview."""

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tasks import encoding, tokenize
from tasks.config import TokenizeConfig, parse_params
from tasks.errors import DataError
from tasks.encoding import IGNORE_INDEX, encode_pair, set_pad_token
from tasks.tokenize import label_preview

from .conftest import mask_spans, merge, shipped_params, stage

EOS, BOS = 2, 1


def cfg(**kw) -> TokenizeConfig:
    return TokenizeConfig(**kw)


def test_prompt_masked_and_eos_appended():
    e = encode_pair([BOS, 10, 11], [20, 21], EOS, BOS, cfg(max_length=32))
    assert e["input_ids"] == [BOS, 10, 11, 20, 21, EOS]
    assert e["labels"] == [IGNORE_INDEX] * 3 + [20, 21, EOS]
    assert e["eos_in_labels"] and e["trainable"] == 3 and e["prompt_cut"] == e["completion_cut"] == 0


def test_loss_on_everything_when_asked():
    e = encode_pair([10, 11], [20], EOS, None, cfg(max_length=16, completion_only_loss=False))
    assert e["labels"] == e["input_ids"] == [10, 11, 20, EOS]


def test_left_truncation_keeps_bos_cue_and_completion():
    e = encode_pair([BOS, 10, 11, 12, 13, 14, 15], [20, 21], EOS, BOS, cfg(max_length=8))
    assert e["input_ids"] == [BOS, 12, 13, 14, 15, 20, 21, EOS]
    assert (e["prompt_cut"], e["completion_cut"]) == (2, 0) and e["eos_in_labels"]


def test_left_truncation_cuts_completion_when_it_alone_is_too_long():
    e = encode_pair([10, 11], [20, 21, 22, 23, 24, 25, 26, 27], EOS, BOS, cfg(max_length=8))
    assert e["input_ids"] == [20, 21, 22, 23, 24, 25, 26, 27]
    assert (e["prompt_cut"], e["completion_cut"]) == (2, 1) and not e["eos_in_labels"]


def test_right_truncation_can_leave_nothing_to_train():
    e = encode_pair([10] * 10, [20, 21], EOS, None, cfg(max_length=8, truncation_side="right"))
    assert len(e["input_ids"]) == 8 and e["trainable"] == 0
    assert (e["prompt_cut"], e["completion_cut"]) == (2, 3)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_pad_token_kept_when_distinct(tok):
    assert set_pad_token(tok).startswith("kept") and tok.pad_token != tok.eos_token


def test_pad_equal_to_eos_is_replaced(tiny_model):
    t = AutoTokenizer.from_pretrained(tiny_model)
    t.pad_token = t.eos_token
    assert "UNK" in set_pad_token(t) and t.pad_token_id == t.unk_token_id != t.eos_token_id
    t.pad_token, t.unk_token = t.eos_token, None
    assert "added" in set_pad_token(t)
    assert t.pad_token == encoding.PAD_TOKEN and t.pad_token_id != t.eos_token_id


def test_label_preview_marks_trained_span(tok):
    p = tok("Summary:", add_special_tokens=False)["input_ids"]
    c = tok(" done", add_special_tokens=False)["input_ids"]
    e = encode_pair(p, c, tok.eos_token_id, tok.bos_token_id, cfg(max_length=32))
    assert label_preview(tok, e, parse_params(shipped_params(), "params.yaml")) == "Summary:[[ done</s>]]"


def _stage(ws: Path, tiny_model: Path, rows: list[dict], chat_template: str | None = None, **tok_cfg):
    """tokenize on `rows`; `chat_template`: a template text given as model.chat_template."""
    import shutil

    shutil.copytree(tiny_model, ws / "models/tiny")
    (ws / "data/prepared").mkdir(parents=True)
    for split in ("train", "validation"):
        (ws / f"data/prepared/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {"name_or_path": "models/tiny"}
    if chat_template is not None:
        (ws / "models/plain.jinja").write_text(chat_template)
        model["chat_template"] = "models/plain.jinja"
    p = parse_params(merge(shipped_params(), {"model": model, "tokenize": tok_cfg,
                                              "evaluate": {"max_new_tokens": 4}}), "params.yaml")
    return stage("tokenize", p)


def test_stage_reports_truncation_and_saves(tmp_path, monkeypatch, tiny_model):
    import datasets

    monkeypatch.chdir(tmp_path)
    rows = [{"id": f"r{i}", "prompt": "word " * (2 + 40 * (i % 2)), "completion": " end"} for i in range(6)]
    stats = _stage(tmp_path, tiny_model, rows, max_length=32)
    train = stats["train"]
    assert train["rows_in"] == train["rows_out"] == 6 and train["rows_over_max_length"] == 3
    assert train["prompt_tokens_cut"]["total"] > 0 and train["rows_without_eos_label"] == 0
    saved = datasets.load_from_disk("data/tokenized")
    assert saved["train"].column_names == ["id", "input_ids", "labels"]
    assert max(len(x) for x in saved["train"]["input_ids"]) == 32
    assert Path("data/tokenized/tokenizer/tokenizer.json").is_file()
    assert "[[" in Path("reports/label_preview.txt").read_text()


def test_stage_drop_policy(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    rows = [{"id": f"r{i}", "prompt": "word " * (2 + 40 * (i % 2)), "completion": " end"} for i in range(6)]
    stats = _stage(tmp_path, tiny_model, rows, max_length=32, overlong="drop")
    assert stats["train"]["rows_out"] == 3 and stats["train"]["rows_dropped"] == 3


def test_zero_trainable_tokens_is_an_error(tmp_path, monkeypatch, tiny_model):
    monkeypatch.chdir(tmp_path)
    rows = [{"id": "long", "prompt": "word " * 40, "completion": " end"}]
    with pytest.raises(DataError, match=r"rows \['long'\] .* no trainable token"):
        _stage(tmp_path, tiny_model, rows, max_length=16, truncation_side="right")
    assert not Path("data/tokenized").exists()


# Multi-turn chat: every assistant turn is trained, as the chat template's generation blocks mark it.
CHAT = [{"role": "system", "content": "You summarize."},
        {"role": "user", "content": "A: hello Bob"}, {"role": "assistant", "content": "A greets Bob."},
        {"role": "user", "content": "B: hi Amanda"}, {"role": "assistant", "content": "B greets Amanda."},
        {"role": "user", "content": "A: bye"}, {"role": "assistant", "content": "A leaves."}]


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


def trained_spans(tok, e) -> list[str]:
    """The decoded runs of an encoded example's tokens that carry their own id as label."""
    trained = [label != IGNORE_INDEX for label in e["labels"]]
    assert all(label == t for t, label, on in zip(e["input_ids"], e["labels"], trained) if on)
    return mask_spans(tok, e["input_ids"], trained)


def test_every_assistant_turn_is_trained_and_the_rest_masked(chat_tok):
    ids, mask = encoding.chat_ids(chat_tok, CHAT, "r")
    e = encoding.encode_chat(ids, mask, chat_tok.eos_token_id, chat_tok.bos_token_id, cfg(max_length=512))
    assistant = [m["content"] for m in CHAT if m["role"] == "assistant"]
    # Each answer and the <|im_end|> (EOS) that ends its turn; no system or user token.
    assert trained_spans(chat_tok, e) == [a + "<|im_end|>" for a in assistant]
    assert e["trainable"] == sum(label != IGNORE_INDEX for label in e["labels"])
    assert e["eos_in_labels"] and e["prompt_cut"] == e["completion_cut"] == 0
    assert chat_tok.decode(e["input_ids"]) == chat_tok.apply_chat_template(CHAT, tokenize=False)
    p = parse_params(shipped_params(), "params.yaml")
    assert label_preview(chat_tok, e, p) == (
        "<|im_start|>system\nYou summarize.<|im_end|>\n<|im_start|>user\nA: hello Bob<|im_end|>\n"
        "<|im_start|>assistant\n[[A greets Bob.<|im_end|>]]\n<|im_start|>user\nB: hi Amanda<|im_end|>\n"
        "<|im_start|>assistant\n[[B greets Amanda.<|im_end|>]]\n<|im_start|>user\nA: bye<|im_end|>\n"
        "<|im_start|>assistant\n[[A leaves.<|im_end|>]]\n")


def test_chat_truncation_cuts_the_earliest_turns_and_counts_them():
    ids, mask = [BOS, 10, 11, 20, 21, EOS, 12, 13, 22, EOS], [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    e = encoding.encode_chat(ids, mask, EOS, BOS, cfg(max_length=8, truncation_side="left"))
    assert e["input_ids"] == [BOS, 20, 21, EOS, 12, 13, 22, EOS]
    assert e["labels"] == [IGNORE_INDEX, 20, 21, EOS, IGNORE_INDEX, IGNORE_INDEX, 22, EOS]
    assert (e["prompt_cut"], e["completion_cut"], e["trainable"]) == (2, 0, 5) and e["eos_in_labels"]
    e = encoding.encode_chat(ids, mask, EOS, BOS, cfg(max_length=8, truncation_side="right"))
    assert e["input_ids"] == ids[:8] and (e["prompt_cut"], e["completion_cut"]) == (0, 2)
    e = encoding.encode_chat(ids, mask, EOS, BOS, cfg(max_length=8, completion_only_loss=False))
    assert e["labels"] == e["input_ids"]


def _chat_rows(turns: int, n: int = 4) -> list[dict]:
    rows = []
    for i in range(n):
        messages = [m for t in range(turns) for m in (
            {"role": "user", "content": f"A: hello {i} {t}"}, {"role": "assistant", "content": f"hi {i} {t}"})]
        rows.append({"id": f"c{i}", "prompt": "unused", "completion": messages[-1]["content"],
                     "messages": messages})
    return rows


# A chat template with no {% generation %} blocks that is not ChatML (the smoke model's before
# it had them): nothing can mark its assistant turns.
UNMARKED_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_multi_turn_chat_without_generation_markers_is_refused(tmp_path, monkeypatch, tiny_model):
    from tasks.errors import TemplateError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError) as err:
        _stage(tmp_path, tiny_model, _chat_rows(turns=2), chat_template=UNMARKED_TEMPLATE)
    message = str(err.value)
    for needle in ("prompt.template: chat", "model.chat_template (models/plain.jinja)", "2 assistant turns",
                   "{% generation %}", "one assistant turn per conversation"):
        assert needle in message
    assert not Path("data/tokenized").exists()


def test_one_turn_chat_without_markers_trains_its_pair(tmp_path, monkeypatch, tiny_model):
    import datasets

    monkeypatch.chdir(tmp_path)
    rows = _chat_rows(turns=1)
    for r in rows:
        r["prompt"] = f"<|user|>\n{r['messages'][0]['content']}\n<|assistant|>\n"
    _stage(tmp_path, tiny_model, rows, chat_template=UNMARKED_TEMPLATE)
    saved = datasets.load_from_disk("data/tokenized")["train"]
    tok = AutoTokenizer.from_pretrained("data/tokenized/tokenizer")
    assert tok.chat_template == UNMARKED_TEMPLATE  # model.chat_template, in the copy train reads
    assert trained_spans(tok, saved[0]) == [f"{rows[0]['completion']}</s>"]
    assert saved[0]["input_ids"] == [*encoding.prompt_ids(tok, [rows[0]["prompt"]])[0],
                                     *tok.encode(rows[0]["completion"], add_special_tokens=False),
                                     tok.eos_token_id]


def test_multi_turn_chat_on_the_smoke_template_trains_every_turn(tmp_path, monkeypatch, tiny_model):
    import datasets

    monkeypatch.chdir(tmp_path)
    rows = _chat_rows(turns=3)
    stats = _stage(tmp_path, tiny_model, rows)
    assert stats["train"]["rows_without_eos_label"] == 0
    saved = datasets.load_from_disk("data/tokenized")["train"]
    tok = AutoTokenizer.from_pretrained("data/tokenized/tokenizer")
    by_id = {r["id"]: r for r in rows}
    for row in saved:
        answers = [m["content"] for m in by_id[row["id"]]["messages"] if m["role"] == "assistant"]
        assert trained_spans(tok, row) == [f"{a}</s>" for a in answers]


@pytest.mark.parametrize(("old", "new", "needle"), [
    # <|im_end|> outside the generation block: the model would never learn to end a turn.
    ("{{- m['content'] + '<|im_end|>' }}{% endgeneration %}",
     "{{- m['content'] }}{% endgeneration %}{{- '<|im_end|>' }}", "ends no assistant turn with EOS"),
    # Only the last answer marked (as templates that drop earlier reasoning do).
    ("{%- if m['role'] == 'assistant' %}", "{%- if m['role'] == 'assistant' and loop.last %}",
     "marks 1 of the conversation's 3 assistant turns"),
])
def test_chat_template_that_cannot_end_or_mark_every_turn_is_refused(chat_tok, old, new, needle):
    from tasks.errors import TemplateError

    from .conftest import CHATML_TEMPLATE

    assert old in CHATML_TEMPLATE
    tok = copy.deepcopy(chat_tok)
    tok.chat_template = CHATML_TEMPLATE.replace(old, new)
    with pytest.raises(TemplateError, match=needle):
        encoding.chat_ids(tok, CHAT, "r")


@pytest.mark.parametrize("template_bos", [False, True])
def test_chat_starts_with_bos_once_when_the_tokenizer_adds_one(chat_tok, template_bos):
    from tokenizers import processors

    from .conftest import CHATML_TEMPLATE

    tok = copy.deepcopy(chat_tok)  # as Llama-2's and Mistral's tokenizers, BOS before every text
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.chat_template = ("{{- bos_token }}" if template_bos else "") + CHATML_TEMPLATE
    ids, mask = encoding.chat_ids(tok, CHAT, "r")
    assert ids[0] == tok.bos_token_id != ids[1] and mask[0] == 0
    assert encoding.prompt_ids(tok, [tok.decode(ids)])[0] == ids  # as generation will see it

# ---- streaming: the output is written chunk by chunk, with the bytes of the in-memory way ----

def _files(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task, max_shard_size", [("causal_lm", None), ("causal_lm", 20_000),
                                                  ("sequence_classification", 20_000)])
def test_dataset_writer_writes_the_bytes_of_save_to_disk(tmp_path, monkeypatch, task, max_shard_size):
    import random

    import datasets

    from tasks.dataset_writer import DatasetWriter

    # Small record batches, and (20 kB) shards whose edges fall inside batches.
    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", 64)
    rng = random.Random(0)
    ids = [[rng.randrange(300) for _ in range(rng.randrange(1, 40))] for _ in range(777)]
    cols = {"id": [f"r{i}" for i in range(777)], "input_ids": ids,
            "labels": [[IGNORE_INDEX] * (len(x) // 2) + x[len(x) // 2:] for x in ids]}
    if task == "sequence_classification":
        cols["labels"] = [len(x) % 3 for x in ids]
    expected = datasets.Dataset.from_dict(cols).select_columns(list(cols), new_fingerprint="f" * 16)
    expected.save_to_disk(str(tmp_path / "expected"), max_shard_size=max_shard_size)
    writer = DatasetWriter(tmp_path / "ours", tokenize.features(task), max_shard_size)
    for start in range(0, 777, 50):  # chunks that do not line up with the record batches
        writer.write({c: v[start:start + 50] for c, v in cols.items()})
    writer.close("f" * 16)
    shards = [name for name in _files(tmp_path / "expected") if name.endswith(".arrow")]
    assert (len(shards) > 1) == bool(max_shard_size)
    assert _files(tmp_path / "ours") == _files(tmp_path / "expected")


def test_dataset_writer_of_no_rows_is_what_save_to_disk_writes(tmp_path):
    import datasets

    from tasks.dataset_writer import DatasetWriter

    cols = {"id": [], "input_ids": [], "labels": []}
    datasets.Dataset.from_dict(cols).select_columns(list(cols), new_fingerprint="0" * 16) \
        .save_to_disk(str(tmp_path / "expected"))
    writer = DatasetWriter(tmp_path / "ours", tokenize.features("causal_lm"))
    writer.write(cols)
    writer.close("0" * 16)
    assert _files(tmp_path / "ours") == _files(tmp_path / "expected")


def _plain_tokenize(tok, rows: list[dict], max_length: int) -> tuple[dict[str, list], int, int]:
    """The straightforward way, every row at once: prompt (with BOS) then completion + EOS, the
    prompt's start cut (after BOS) to fit, prompt tokens labelled -100. Also returns the rows
    cut and the prompt tokens cut."""
    cols: dict[str, list] = {"id": [], "input_ids": [], "labels": []}
    over = cut = 0
    for r in rows:
        prompt = tok(r["prompt"])["input_ids"]
        completion = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        extra = max(0, len(prompt) + len(completion) - max_length)
        head = prompt[:1] if prompt[:1] == [tok.bos_token_id] else []
        prompt = head + prompt[len(head) + extra:]
        over, cut = over + (extra > 0), cut + extra
        cols["id"].append(r["id"])
        cols["input_ids"].append(prompt + completion)
        cols["labels"].append([IGNORE_INDEX] * len(prompt) + completion)
    return cols, over, cut


def test_streamed_output_is_deterministic_and_equals_the_in_memory_tokenization(tmp_path, monkeypatch,
                                                                               tiny_model):
    import hashlib

    import datasets

    from bench.run import scale_rows
    from tasks.modeling import load_tokenizer

    # Chunks of 7 rows, record batches of 16: many of both, and their edges apart.
    monkeypatch.setattr(tokenize, "CHUNK_ROWS", 7)
    monkeypatch.setattr(datasets.config, "DEFAULT_MAX_BATCH_SIZE", 16)
    rows = list(scale_rows(61, scenes=1)) + [{"id": "long", "prompt": "word " * 300, "completion": " end"}]
    runs = []
    for name in ("first", "second"):
        ws = tmp_path / name
        ws.mkdir()
        monkeypatch.chdir(ws)
        stats = _stage(ws, tiny_model, rows, max_length=160)  # about half the rows are cut
        runs.append(_files(ws / "data/tokenized"))
    assert runs[0] == runs[1]
    p = parse_params(merge(shipped_params(), {"model": {"name_or_path": "models/tiny"},
                                              "tokenize": {"max_length": 160},
                                              "evaluate": {"max_new_tokens": 4}}), "params.yaml")
    tok = load_tokenizer(p.model)
    cols, over, cut = _plain_tokenize(tok, rows, 160)
    saved = datasets.load_from_disk("data/tokenized")["train"]
    assert saved.to_dict() == cols
    train = stats["train"]
    assert (train["rows_in"], train["rows_over_max_length"], train["prompt_tokens_cut"]["total"]) == (62, over, cut)
    assert 10 < over < 60 and train["rows_without_eos_label"] == 0
    assert train["tokens"] == sum(map(len, cols["input_ids"]))
    assert train["trainable_tokens"] == sum(x != IGNORE_INDEX for lab in cols["labels"] for x in lab)
    # The bytes of the former in-memory way: Dataset.from_dict(...).save_to_disk, fingerprinted
    # by a hash of all rows.
    fingerprint = hashlib.sha256(json.dumps([rows, p.tokenize.model_dump(exclude=tokenize.REPORT_ONLY),
                                             p.model.task, p.model.labels, tok.name_or_path],
                                            sort_keys=True).encode()).hexdigest()[:16]
    datasets.Dataset.from_dict(cols).select_columns(list(cols), new_fingerprint=fingerprint) \
        .save_to_disk(str(tmp_path / "in-memory"))
    assert {k.removeprefix("train/"): v for k, v in runs[1].items() if k.startswith("train/")} \
        == _files(tmp_path / "in-memory")
    previews = [label_preview(tok, {"input_ids": cols["input_ids"][i], "labels": cols["labels"][i]}, p)
                for i in range(3)]
    assert Path("reports/label_preview.txt").read_text().endswith("\n\n-----\n\n".join(previews) + "\n")


def test_report_only_params_leave_the_tokenized_data_alone(tmp_path, monkeypatch, tiny_model):
    """tokenize.preview_rows shapes reports/label_preview.txt only: data/tokenized keeps its
    bytes (its state.json fingerprint too), so DVC does not rerun train; max_length, which
    shapes the data, changes them."""
    from tasks.io import sha256_path

    rows = [{"id": f"r{i}", "prompt": "word " * (2 + 40 * (i % 2)), "completion": " end"} for i in range(6)]
    hashes, previews = {}, {}
    for name, tok_cfg in {"preview_1": {"max_length": 32, "preview_rows": 1},
                          "preview_4": {"max_length": 32, "preview_rows": 4},
                          "max_length_48": {"max_length": 48, "preview_rows": 1}}.items():
        ws = tmp_path / name
        ws.mkdir()
        monkeypatch.chdir(ws)
        _stage(ws, tiny_model, rows, **tok_cfg)
        hashes[name] = sha256_path(ws / "data/tokenized")
        previews[name] = (ws / "reports/label_preview.txt").read_text()
    assert hashes["preview_1"] == hashes["preview_4"]
    assert previews["preview_1"] != previews["preview_4"]
    assert hashes["max_length_48"] != hashes["preview_1"]


def test_drop_policy_streams_the_kept_rows_in_order(tmp_path, monkeypatch, tiny_model):
    import datasets

    monkeypatch.setattr(tokenize, "CHUNK_ROWS", 2)
    monkeypatch.chdir(tmp_path)
    rows = [{"id": f"r{i}", "prompt": "word " * (2 + 40 * (i % 3 == 1)), "completion": " end"} for i in range(9)]
    stats = _stage(tmp_path, tiny_model, rows, max_length=32, overlong="drop")
    assert (stats["train"]["rows_out"], stats["train"]["rows_dropped"]) == (6, 3)
    assert datasets.load_from_disk("data/tokenized")["train"]["id"] == [f"r{i}" for i in range(9) if i % 3 != 1]
