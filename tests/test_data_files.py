"""prepare on data as it is shipped: split files, TSV and other delimiters, compressed JSONL,
several files (a list or a glob) per split, and test rows with several references."""

import codecs
import csv
import gzip
import json
from pathlib import Path

import pytest
import zstandard

from tasks.config import parse_params
from tasks.errors import ConfigError, DataError

from .conftest import merge, shipped_params, stage


def rows(n: int, start: int = 0, prefix: str = "r") -> list[dict]:
    return [{"id": f"{prefix}{i}", "dialogue": f"A: hello {i}", "summary": f"greeting {i}"}
            for i in range(start, start + n)]


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def params(**data):
    return parse_params(merge(shipped_params(), {"data": data}), "params.yaml")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def prepared() -> dict[str, list[dict]]:
    return {s: [json.loads(x) for x in Path(f"data/prepared/{s}.jsonl").read_text().splitlines()]
            for s in ("train", "validation", "test")}


def ids(split_rows: list[dict]) -> set[str]:
    return {r["id"] for r in split_rows}


def test_split_files_keep_the_official_test_set(ws):
    write(ws / "data/raw/train.jsonl", jsonl_bytes(rows(150)))
    write(ws / "data/raw/test.jsonl", jsonl_bytes(rows(20, prefix="t")))
    stats = stage("prepare", params(path={"train": "data/raw/train.jsonl", "test": "data/raw/test.jsonl"}))
    out = prepared()
    assert ids(out["test"]) == {f"t{i}" for i in range(20)}
    # validation is carved out of train by the hash split, exactly as with one file; the rows
    # the hash would have sent to test stay in train.
    write(ws / "data/raw/all.jsonl", jsonl_bytes(rows(150)))
    stage("prepare", params(path="data/raw/all.jsonl"))
    hashed = prepared()
    assert ids(out["validation"]) == ids(hashed["validation"]) and out["validation"]
    assert ids(out["train"]) == ids(hashed["train"]) | ids(hashed["test"])
    assert stats["rows_per_split"] == {"train": len(out["train"]), "validation": len(out["validation"]),
                                       "test": 20}


def test_three_split_files_are_taken_as_they_are(ws):
    for split, prefix, n in (("train", "a", 40), ("dev", "b", 7), ("test", "c", 9)):
        write(ws / f"data/raw/{split}.jsonl", jsonl_bytes(rows(n, prefix=prefix)))
    stage("prepare", params(path={"train": "data/raw/train.jsonl", "validation": "data/raw/dev.jsonl",
                             "test": "data/raw/test.jsonl"}))
    out = prepared()
    assert [len(out[s]) for s in ("train", "validation", "test")] == [40, 7, 9]
    assert {r["id"][0] for r in out["validation"]} == {"b"}


def _tsv(records: list[dict], delimiter: str = "\t") -> bytes:
    lines = [delimiter.join(("id", "dialogue", "summary"))]
    lines += [delimiter.join((r["id"], r["dialogue"], r["summary"])) for r in records]
    return ("\r\n".join(lines) + "\r\n").encode()


# Each writes the same 80 rows in another shape; all must prepare to the same splits.
SHAPES = {
    "tsv_bom_crlf": ({"path": "data/raw/d.tsv"},
                     {"d.tsv": codecs.BOM_UTF8 + _tsv(rows(80))}),
    "semicolon_csv": ({"path": "data/raw/d.csv", "delimiter": ";"},
                      {"d.csv": _tsv(rows(80), ";")}),
    "jsonl_gz": ({"path": "data/raw/d.jsonl.gz"},
                 {"d.jsonl.gz": gzip.compress(codecs.BOM_UTF8 + jsonl_bytes(rows(80)).replace(b"\n", b"\r\n"))}),
    "jsonl_zst": ({"path": "data/raw/d.jsonl.zst"},
                  {"d.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl_bytes(rows(80)))}),
    "glob": ({"path": "data/raw/part-*.jsonl"},
             {"part-2.jsonl": jsonl_bytes(rows(30, 50)), "part-1.jsonl": jsonl_bytes(rows(50))}),
    "list_mixed_formats": ({"path": ["data/raw/b.jsonl.gz", "data/raw/a.tsv"]},
                           {"a.tsv": _tsv(rows(50)), "b.jsonl.gz": gzip.compress(jsonl_bytes(rows(30, 50)))}),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_formats_and_several_files_read_like_one_jsonl(ws, shape):
    write(ws / "data/raw/plain.jsonl", jsonl_bytes(rows(80)))
    stage("prepare", params(path="data/raw/plain.jsonl"))
    expected = prepared()
    data, files = SHAPES[shape]
    for name, content in files.items():
        write(ws / "data/raw" / name, content)
    assert stage("prepare", params(**data))["rows_out"] == 80
    assert prepared() == expected


def test_several_files_are_read_in_sorted_order(ws):
    # Without ids, a row's id is its position: sorted file order makes it the same every run.
    write(ws / "data/raw/b.jsonl", jsonl_bytes(rows(40, 40)))
    write(ws / "data/raw/a.jsonl", jsonl_bytes(rows(40)))
    stage("prepare", params(path=["data/raw/b.jsonl", "data/raw/a.jsonl"], id_column=None))
    by_id = {r["id"]: r for split in prepared().values() for r in split}
    assert by_id["row0"]["completion"].strip() == "greeting 0"
    assert by_id["row40"]["completion"].strip() == "greeting 40"


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.jsonl.gz", gzip.compress(jsonl_bytes(rows(3)) + b"{oops\n"),
     r"data/raw/d.jsonl.gz line 4: Expecting property name"),
    ("d.jsonl.gz", gzip.compress(jsonl_bytes(rows(40)))[:-12],
     r"data/raw/d.jsonl.gz line \d+: cannot decompress"),
    ("d.jsonl.zst", b"not zstd at all\n", r"data/raw/d.jsonl.zst line 1: cannot decompress"),
    ("d.tsv", "id\tdialogue\tsummary\nr0\tA: hi\tgreet\n".encode("utf-16"),
     r"data/raw/d.tsv line 1: not UTF-8 text"),
])
def test_bad_files_are_named_with_the_line(ws, name, content, message):
    write(ws / "data/raw" / name, content)
    with pytest.raises(DataError, match=message):
        stage("prepare", params(path=f"data/raw/{name}"))
    assert not Path("data/prepared").exists()


def test_missing_split_files_name_the_key(ws):
    write(ws / "data/raw/train.jsonl", jsonl_bytes(rows(40)))
    with pytest.raises(DataError, match=r"^data.path.test: no file matches data/raw/test-\*.jsonl$"):
        stage("prepare", params(path={"train": "data/raw/train.jsonl", "test": "data/raw/test-*.jsonl"}))
    with pytest.raises(DataError, match=r"^data.path.validation: data/raw/dev.jsonl does not exist$"):
        stage("prepare", params(path={"train": "data/raw/train.jsonl", "validation": "data/raw/dev.jsonl"}))
    write(ws / "data/raw/empty.tsv", b"")
    with pytest.raises(DataError, match=r"^data.path: data/raw/empty.tsv is empty$"):
        stage("prepare", params(path=["data/raw/train.jsonl", "data/raw/empty.tsv"]))


@pytest.mark.parametrize(("data", "message"), [
    ({"path": {"train": "data/raw/t.jsonl", "test": "/tmp/test.jsonl"}},
     "data: path.test: local data must be under data/raw/"),
    ({"path": {"train": "data/raw/t.xlsx"}}, "data: path.train: 'data/raw/t.xlsx' is not a format"),
    ({"path": {"validation": "data/raw/v.jsonl"}}, r"1 problem\(s\):\n  - data.path.train: Field required$"),
    ({"path": {"train": "data/raw/t.jsonl"}, "split": {"source_splits": {"test": "test"}}},
     "split.source_splits needs a Hub dataset"),
    ({"path": "data/raw/t.tsv", "delimiter": "ab"}, "data.delimiter: String should have at most 1"),
])
def test_split_file_params_are_checked(data, message):
    with pytest.raises(ConfigError, match=message):
        params(**data)


def test_list_valued_reference_field(ws):
    records = [{**r, "summary": [r["summary"], f"hi number {i}", f"a greeting {i}"]}
               for i, r in enumerate(rows(60))]
    write(ws / "data/raw/d.jsonl", jsonl_bytes(records))
    stage("prepare", params(path="data/raw/d.jsonl"))
    out = prepared()
    row = out["test"][0]
    i = row["id"][1:]
    assert row["completion"] == f" greeting {i}"  # the first reference is what training sees
    assert row["references"] == [f"greeting {i}", f"hi number {i}", f"a greeting {i}"]
    assert all("references" not in r for r in out["train"] + out["validation"])


def test_reference_columns_on_an_official_test_file(ws):
    # DialogSum's shape: train rows carry `summary`, test rows summary1..3 and no `summary`.
    write(ws / "data/raw/train.jsonl", jsonl_bytes(rows(50)))
    test = [{"id": f"t{i}", "dialogue": f"B: bye {i}", "summary1": f"farewell {i}",
             "summary2": f"bye {i}", "summary3": f"leaving {i}"} for i in range(5)]
    write(ws / "data/raw/test.tsv", _tsv_any(test))
    stage("prepare", params(path={"train": "data/raw/train.jsonl", "test": "data/raw/test.tsv"},
                       references=["summary1", "summary2", "summary3"]))
    row = prepared()["test"][0]
    assert row["completion"] == " farewell 0"
    assert row["references"] == ["farewell 0", "bye 0", "leaving 0"]


def _tsv_any(records: list[dict]) -> bytes:
    with open("tmp.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(records)
    return Path("tmp.tsv").read_bytes()


def test_references_need_a_one_field_completion():
    with pytest.raises(ConfigError, match="data.references needs a generative model.task"):
        parse_params(merge(shipped_params(), {
            "data": {"references": ["a", "b"]},
            "prompt": {"template": "Q: {q}", "completion": " {a} because {b}"}}), "params.yaml")


def _mixture(ws, seed: int = 42, **limits) -> dict:
    """Three sources: dialogues (jsonl), Q&A pairs (tsv, own template and columns), and
    instructions whose ids collide with the dialogues'."""
    write(ws / "data/raw/dialogues.jsonl", jsonl_bytes(rows(300)))
    qa = [{"id": f"q{i}", "Q": f"what is {i}?", "A": str(i)} for i in range(200)]
    write(ws / "data/raw/qa.tsv", _tsv_any(qa))
    write(ws / "data/raw/inst.jsonl", jsonl_bytes(
        [{"id": f"r{i}", "instruction": f"say {i}", "input": "", "response": f"{i}"} for i in range(100)]))
    return {"path": None, "split": {"seed": seed}, "sources": [
        {"path": "data/raw/dialogues.jsonl", "label": "dialogues", **limits.get("dialogues", {})},
        {"path": "data/raw/qa.tsv", "label": "qa", "template": "question_answer",
         "columns": {"question": "Q", "answer": "A"}, **limits.get("qa", {})},
        {"path": "data/raw/inst.jsonl", "template": "instruction", **limits.get("inst", {})}]}


def test_mixture_weights_caps_and_rows_per_source(ws):
    data = _mixture(ws, dialogues={"weight": 3}, qa={"weight": 1}, inst={"row_cap": 40})
    stats = stage("prepare", params(**data))
    out = prepared()
    per_source = stats["rows_per_source"]
    assert set(per_source) == {"dialogues", "qa", "source2"}
    total = {label: sum(n.values()) for label, n in per_source.items()}
    # 3:1 with 300 dialogues and 200 Q&A: all dialogues, 100 Q&A; the capped source 40.
    assert total == {"dialogues": 300, "qa": 100, "source2": 40}
    for split, rows_ in out.items():
        assert {label: n[split] for label, n in per_source.items()} == \
            {label: sum(r["id"].startswith(label + "/") for r in rows_) for label in per_source}
    # Each source keeps its own template; colliding ids stay apart under their labels.
    by_id = {r["id"]: r for split_rows in out.values() for r in split_rows}
    assert "dialogues/r0" in by_id and by_id["dialogues/r0"]["prompt"].startswith("Summarize")
    assert any(i.startswith("qa/q") and by_id[i]["prompt"].startswith("Please answer") for i in by_id)
    assert stats["rows_per_split"] == {s: len(r) for s, r in out.items()}
    # Deterministic by seed: the same rows again; another seed picks other Q&A rows.
    stage("prepare", params(**data))
    assert prepared() == out
    data["split"]["seed"] = 7
    stage("prepare", params(**data))
    qa_ids = {r["id"] for split_rows in prepared().values() for r in split_rows if r["id"].startswith("qa/")}
    assert len(qa_ids) == 100 and qa_ids != {i for i in by_id if i.startswith("qa/")}


@pytest.mark.parametrize(("data", "message"), [
    ({"sources": [{"path": "data/raw/a.jsonl"}]}, "give data.path .* or data.sources .*, not both"),
    ({"path": None, "sources": [{"path": "data/raw/a.jsonl", "weight": 1, "row_cap": 5}]},
     "data.sources.0: give a source a weight or a row_cap, not both"),
    ({"path": None, "sources": [{"path": "/etc/a.jsonl"}]},
     "data: sources.0: path: local data must be under data/raw/"),
    ({"path": None, "sources": [{"path": "data/raw/a.jsonl", "template": "nope"}]},
     "data: sources.0: template 'nope' is neither a built-in"),
    ({"path": None, "sources": [{"path": "data/raw/a.jsonl", "label": "a/b"}]},
     "data.sources.0.label: String should match pattern"),
])
def test_mixture_params_are_checked(data, message):
    with pytest.raises(ConfigError, match=message):
        params(**data)


# --- .json and .csv read as they stream ------------------------------------------------------

def _json_records(text: str, chunk: int, monkeypatch, tmp_path) -> list:
    from tasks import records

    monkeypatch.setattr(records, "TEXT_CHUNK_BYTES", chunk)
    path = write(tmp_path / "d.json", codecs.BOM_UTF8 + text.encode())
    return [(record, bad) for _, record, bad in records._json(path)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_list_parses_the_same_in_any_chunks(chunk, indent, monkeypatch, tmp_path):
    """Records, multi-byte characters and CRLF line ends split across reads at every offset
    come out as json.loads gives them; a non-object is named, not dropped."""
    data = [{"id": f"r{i}", "dialogue": "héllo € 😀\n" * i, "nested": [1, {"a": None}]} for i in range(6)] + [7]
    text = json.dumps(data, ensure_ascii=False, indent=indent).replace("\n", "\r\n")
    got = _json_records(text, chunk, monkeypatch, tmp_path)
    assert got == [(r, None) for r in data[:-1]] + [(None, "malformed_json: expected a JSON object")]


@pytest.mark.parametrize("chunk", [2, 1 << 20])
def test_a_broken_json_list_names_the_line_json_would(chunk, monkeypatch, tmp_path):
    text = json.dumps([{"id": f"r{i}"} for i in range(5)], indent=1)
    broken = text.replace('"r3"', '"r3" "x"')
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(broken)
    with pytest.raises(DataError, match=rf"d.json line {expected.value.lineno}: not a valid JSON file: "
                                        rf"Expecting ',' delimiter at column {expected.value.colno}"):
        _json_records(broken, chunk, monkeypatch, tmp_path)


@pytest.mark.parametrize("chunk", [1, 2, 1 << 20])
@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_csv_lines_end_as_a_text_file_ends_them_in_any_chunks(chunk, ending, monkeypatch, tmp_path):
    """\n, \r\n and an old Mac's lone \r all end a row, also when a read splits \r from \n;
    a line break inside quotes stays in the field, and each row is named by its line."""
    from tasks import records

    monkeypatch.setattr(records, "TEXT_CHUNK_BYTES", chunk)
    text = ending.join(["id,dialogue", "r0,hello", 'r1,"two' + ending + 'lines"', "r2,é€", ""])
    path = write(tmp_path / "d.csv", text.encode())
    got = [(where.rsplit(" ", 2)[1:], record) for where, record, _ in records._csv(path, ",")]
    assert got == [(["line", "2"], {"id": "r0", "dialogue": "hello"}),
                   (["line", "4"], {"id": "r1", "dialogue": "two" + ending + "lines"}),
                   (["line", "5"], {"id": "r2", "dialogue": "é€"})]


def test_json_and_csv_files_are_read_in_bounded_memory(tmp_path, monkeypatch):
    """prepare holds a few chunks and a record of a .json or .csv file, not the file: with
    64 KiB chunks the peak of reading a 4.6 MB file stays under an eighth of it."""
    import tracemalloc

    from tasks import records

    monkeypatch.setattr(records, "TEXT_CHUNK_BYTES", 1 << 16)

    data = rows(60_000)
    json_file = write(tmp_path / "d.json", json.dumps(data).encode())
    csv_file = tmp_path / "d.csv"
    with csv_file.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    for path, reader in ((json_file, records._json(json_file)), (csv_file, records._csv(csv_file, ","))):
        tracemalloc.start()
        count = sum(1 for _ in reader)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == len(data)
        assert peak < path.stat().st_size / 8, (path.name, peak, path.stat().st_size)
