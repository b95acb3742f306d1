"""prepare: sources, field mapping, deterministic split, bad-record policy and stats."""

import json
from pathlib import Path

import pytest

from tasks import prepare
from tasks.config import parse_params
from tasks.errors import DataError

from .conftest import merge, shipped_params


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "dialogue": f"A: hello {i}", "summary": f"greeting {i}"}
            for i in range(start, start + n)]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def params(**over):
    return parse_params(merge(shipped_params(), over), "params.yaml")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read_split(split: str) -> list[dict]:
    return [json.loads(x) for x in Path(f"data/prepared/{split}.jsonl").read_text().splitlines()]


def test_writes_splits_and_stats(ws):
    write_jsonl(ws / "data/raw/dialogues.jsonl", rows(200))
    stats = prepare.run(params())
    assert stats["rows_in"] == stats["rows_out"] == 200 and stats["rows_dropped"] == 0
    split_rows = {s: read_split(s) for s in ("train", "validation", "test")}
    assert sum(map(len, split_rows.values())) == 200
    assert all(len(v) > 0 for v in split_rows.values())
    first = split_rows["train"][0]
    assert set(first) == {"id", "prompt", "completion"}
    assert first["prompt"].startswith("Summarize the following conversation.")
    assert json.loads(Path("metrics/prepare.json").read_text()) == stats


def test_split_is_stable_when_rows_are_added_or_reordered(ws):
    write_jsonl(ws / "data/raw/dialogues.jsonl", rows(100))
    prepare.run(params())
    before = {r["id"] for r in read_split("test")}
    write_jsonl(ws / "data/raw/dialogues.jsonl", list(reversed(rows(100))) + rows(50, start=100))
    prepare.run(params())
    after = {r["id"] for r in read_split("test")}
    assert before <= after


def test_field_mapping_and_csv(ws):
    path = ws / "data/raw/qa.csv"
    path.parent.mkdir(parents=True)
    path.write_text("key,Question,Answer\n" + "".join(f"k{i},what is {i}?,{i}\n" for i in range(60)))
    p = params(data={"path": "data/raw/qa.csv", "id_column": "key",
                     "columns": {"question": "Question", "answer": "Answer"}},
               prompt={"template": "question_answer"})
    assert prepare.run(p)["rows_out"] == 60
    row = read_split("train")[0]
    assert row["prompt"].startswith("Please answer the following question.\nQ: what is")


def test_parquet_source(ws):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "data/raw").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows(50)), ws / "data/raw/d.parquet")
    assert prepare.run(params(data={"path": "data/raw/d.parquet"}))["rows_out"] == 50


def test_malformed_line_names_file_and_line(ws):
    path = write_jsonl(ws / "data/raw/dialogues.jsonl", rows(3))
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"dialogues.jsonl line 4: .*on_bad_record: skip"):
        prepare.run(params())
    assert not Path("data/prepared").exists()


def test_skip_policy_counts_reasons(ws):
    bad = [{"id": "x1", "dialogue": "only dialogue"}, {"id": "r0", "dialogue": "d", "summary": "dup"},
           {"id": "x2", "dialogue": "d", "summary": "   "}]
    path = write_jsonl(ws / "data/raw/dialogues.jsonl", rows(60) + bad)
    path.write_bytes(path.read_bytes() + b'{"id": "x3", "dialogue": "\xff"}\n')
    stats = prepare.run(params(data={"on_bad_record": "skip"}))
    assert stats["rows_in"] == 64 and stats["rows_out"] == 60
    assert stats["dropped_by_reason"] == {"duplicate_id": 1, "empty_completion": 1,
                                          "missing_field": 1, "not_utf8": 1}


@pytest.mark.parametrize(("content", "needle"), [
    (None, "does not exist"), (b"", "is empty"), (b"\n\n", "has no records"),
])
def test_missing_or_empty_source(ws, content, needle):
    if content is not None:
        (ws / "data/raw").mkdir(parents=True)
        (ws / "data/raw/dialogues.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=needle):
        prepare.run(params())


def test_empty_split_is_an_error(ws):
    write_jsonl(ws / "data/raw/dialogues.jsonl", rows(2))
    with pytest.raises(DataError, match="split is empty"):
        prepare.run(params())


def test_chat_template_from_the_models_tokenizer(ws, tiny_model):
    import shutil

    shutil.copytree(tiny_model, ws / "models/tiny")
    chats = [{"id": f"c{i}", "conversation": [{"role": "user", "content": f"hi {i}"},
                                              {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(40)]
    write_jsonl(ws / "data/raw/chats.jsonl", chats)
    p = params(data={"path": "data/raw/chats.jsonl", "columns": {"messages": "conversation"}},
               prompt={"template": "chat"}, model={"name_or_path": "models/tiny"})
    assert prepare.run(p)["rows_out"] == 40
    row = read_split("train")[0]
    n = row["id"][1:]
    assert row == {"id": f"c{n}", "prompt": f"<|user|>\nhi {n}\n<|assistant|>\n", "completion": f"hello {n}"}
