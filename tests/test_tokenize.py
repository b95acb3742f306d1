"""tokenize: label masking, EOS, truncation accounting, pad token, preview."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tasks import tokenize
from tasks.config import TokenizeConfig, parse_params
from tasks.errors import DataError
from tasks.tokenize import IGNORE_INDEX, encode_pair, label_preview, set_pad_token

from .conftest import merge, shipped_params

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
    assert t.pad_token == tokenize.PAD_TOKEN and t.pad_token_id != t.eos_token_id


def test_label_preview_marks_trained_span(tok):
    p = tok("Summary:", add_special_tokens=False)["input_ids"]
    c = tok(" done", add_special_tokens=False)["input_ids"]
    e = encode_pair(p, c, tok.eos_token_id, tok.bos_token_id, cfg(max_length=32))
    assert label_preview(tok, e, parse_params(shipped_params(), "params.yaml")) == "Summary:[[ done</s>]]"


def _stage(ws: Path, tiny_model: Path, rows: list[dict], **tok_cfg):
    import shutil

    shutil.copytree(tiny_model, ws / "models/tiny")
    (ws / "data/prepared").mkdir(parents=True)
    for split in ("train", "validation"):
        (ws / f"data/prepared/{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = parse_params(merge(shipped_params(), {"model": {"name_or_path": "models/tiny"},
                                              "tokenize": tok_cfg, "evaluate": {"max_new_tokens": 4}}),
                     "params.yaml")
    return tokenize.run(p)


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
