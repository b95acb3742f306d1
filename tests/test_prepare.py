"""prepare: sources, field mapping, deterministic split, bad-record policy and stats."""

import json
from pathlib import Path

import pytest

from tasks.config import parse_params
from tasks.errors import DataError
from tasks.records import split_of

from .conftest import merge, shipped_params, stage


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
    stats = stage("prepare", params())
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
    stage("prepare", params())
    before = {r["id"] for r in read_split("test")}
    write_jsonl(ws / "data/raw/dialogues.jsonl", list(reversed(rows(100))) + rows(50, start=100))
    stage("prepare", params())
    after = {r["id"] for r in read_split("test")}
    assert before <= after


def test_field_mapping_and_csv(ws):
    path = ws / "data/raw/qa.csv"
    path.parent.mkdir(parents=True)
    path.write_text("key,Question,Answer\n" + "".join(f"k{i},what is {i}?,{i}\n" for i in range(60)))
    p = params(data={"path": "data/raw/qa.csv", "id_column": "key",
                     "columns": {"question": "Question", "answer": "Answer"}},
               prompt={"template": "question_answer"})
    assert stage("prepare", p)["rows_out"] == 60
    row = read_split("train")[0]
    assert row["prompt"].startswith("Please answer the following question.\nQ: what is")


def test_parquet_source(ws):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (ws / "data/raw").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows(50)), ws / "data/raw/d.parquet")
    assert stage("prepare", params(data={"path": "data/raw/d.parquet"}))["rows_out"] == 50


def test_malformed_line_names_file_and_line(ws):
    path = write_jsonl(ws / "data/raw/dialogues.jsonl", rows(3))
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"dialogues.jsonl line 4: .*on_bad_record: skip"):
        stage("prepare", params())
    assert not Path("data/prepared").exists()


def test_skip_policy_counts_reasons(ws):
    bad = [{"id": "x1", "dialogue": "only dialogue"}, {"id": "r0", "dialogue": "d", "summary": "dup"},
           {"id": "x2", "dialogue": "d", "summary": "   "}]
    path = write_jsonl(ws / "data/raw/dialogues.jsonl", rows(60) + bad)
    path.write_bytes(path.read_bytes() + b'{"id": "x3", "dialogue": "\xff"}\n')
    stats = stage("prepare", params(data={"on_bad_record": "skip"}))
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
        stage("prepare", params())


def test_empty_split_is_an_error(ws):
    write_jsonl(ws / "data/raw/dialogues.jsonl", rows(2))
    with pytest.raises(DataError, match="split is empty"):
        stage("prepare", params())


def test_chat_template_from_the_models_tokenizer(ws, tiny_model):
    import shutil

    shutil.copytree(tiny_model, ws / "models/tiny")
    chats = [{"id": f"c{i}", "conversation": [{"role": "user", "content": f"hi {i}"},
                                              {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(40)]
    write_jsonl(ws / "data/raw/chats.jsonl", chats)
    p = params(data={"path": "data/raw/chats.jsonl", "columns": {"messages": "conversation"}},
               prompt={"template": "chat"}, model={"name_or_path": "models/tiny"})
    assert stage("prepare", p)["rows_out"] == 40
    row = read_split("train")[0]
    n = row["id"][1:]
    assert row == {"id": f"c{n}", "prompt": f"<|user|>\nhi {n}\n<|assistant|>\n", "completion": f"hello {n}",
                   "messages": chats[int(n)]["conversation"]}


def test_multi_turn_chat_keeps_the_conversation_for_training_only(ws, tiny_model):
    import shutil

    shutil.copytree(tiny_model, ws / "models/tiny")
    chats = [{"conversation": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "bye"}, {"role": "assistant", "content": f"bye {i}"}]}
             for i in range(40)]
    write_jsonl(ws / "data/raw/chats.jsonl", chats)
    p = params(data={"path": "data/raw/chats.jsonl", "columns": {"messages": "conversation"}, "id_column": None},
               prompt={"template": "chat"}, model={"name_or_path": "models/tiny"})
    stage("prepare", p)
    train, test = read_split("train"), read_split("test")
    # The last turn stays the pair evaluate generates (an earlier answer ends with the smoke
    # template's EOS, as training sees it); training rows carry every turn.
    i = int(test[0]["completion"].split()[1])
    assert test[0] == {"id": test[0]["id"], "completion": f"bye {i}",
                       "prompt": f"<|user|>\nhi {i}\n<|assistant|>\nhello</s>\n<|user|>\nbye\n<|assistant|>\n"}
    assert all(r["messages"] == chats[int(r["completion"].split()[1])]["conversation"] for r in train)
    # Without an id column a row's split hashes its rendered pair, as before it kept its messages.
    key = json.dumps({"prompt": test[0]["prompt"], "completion": test[0]["completion"]}, sort_keys=True)
    assert split_of(key, p) == "test"


# Leakage (tasks/leakage.py): rows of distinct random words, so that only planted twins match.
def dialogues(n: int) -> list[dict]:
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    return [{"id": f"r{i}", "dialogue": " ".join(rng.choices(words, k=40)), "summary": f"s {i}"}
            for i in range(n)]


def planted(p) -> list[dict]:
    """Three held-out rows copying train rows under new ids: exact, re-cased with other
    spacing and punctuation, and with one word of forty changed."""
    base = dialogues(120)
    train = [r for r in base if split_of(r["id"], p) == "train"]
    held_out = (f"x{i}" for i in range(1000) if split_of(f"x{i}", p) != "train")
    words = train[2]["dialogue"].split()
    variants = [train[0]["dialogue"], "  " + train[1]["dialogue"].upper().replace(" ", " ,  ") + "!",
                " ".join(words[:20] + ["changed"] + words[21:])]
    return base + [{"id": next(held_out), "dialogue": d, "summary": "copy"} for d in variants]


def leakage_params(**data):
    return params(data=data)


def test_normalize():
    from tasks.leakage import normalize

    assert normalize("  Hello,\tWORLD!\n  again? ") == "hello world again"


def test_leakage_found_and_counted_on_warn(ws):
    p = leakage_params(on_leakage="warn")
    write_jsonl(ws / "data/raw/dialogues.jsonl", planted(p))
    stats = stage("prepare", p)
    leak = stats["leakage"]
    assert leak["rows"] == 3 and leak["dropped"] == 0
    assert {k: sum(leak[k].values()) for k in ("exact", "normalized", "near")} == \
        {"exact": 1, "normalized": 1, "near": 1}
    assert stats["rows_out"] == 123
    assert json.loads(Path("metrics/prepare.json").read_text())["leakage"] == leak


def test_no_leakage_in_distinct_rows(ws):
    write_jsonl(ws / "data/raw/dialogues.jsonl", dialogues(120))
    assert stage("prepare", leakage_params(on_leakage="error"))["leakage"]["rows"] == 0


def test_leakage_drop_removes_held_out_rows_only(ws):
    p = leakage_params(on_leakage="drop")
    write_jsonl(ws / "data/raw/dialogues.jsonl", planted(p))
    stats = stage("prepare", p)
    assert stats["leakage"]["dropped"] == 3 and stats["dropped_by_reason"] == {"leakage": 3}
    assert stats["rows_in"] == stats["rows_out"] + stats["rows_dropped"] == 123
    held_out = {r["id"] for s in ("validation", "test") for r in read_split(s)}
    assert not any(i.startswith("x") for i in held_out)
    assert len(read_split("train")) == stats["rows_per_split"]["train"]
    assert sum(1 for r in read_split("train") if r["id"].startswith("r")) == len(read_split("train"))


def test_leakage_error_is_one_line_naming_rows(ws, capsys):
    import yaml

    from tasks.cli import main

    p = leakage_params(on_leakage="error")
    rows_ = planted(p)
    write_jsonl(ws / "data/raw/dialogues.jsonl", rows_)
    (ws / "params.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json")))
    assert main(["prepare", "--params", "params.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.on_leakage" in err[0] and "3 held-out rows" in err[0]
    for planted_id in (r["id"] for r in rows_[-3:]):
        assert planted_id in err[0]
    assert not Path("data/prepared").exists()


def test_leakage_threshold_is_validated():
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="data.leakage_threshold"):
        leakage_params(leakage_threshold=1.5)


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_streamed_leakage_finds_what_an_in_memory_index_finds(tmp_path, monkeypatch, threshold):
    """Train streams past an index of the held-out rows, in chunks: the same leaks, twins
    and similarities as an LSH of every row, held-out rows also matching earlier held-out
    ones (exact, re-cased, one word changed, and unrelated rows)."""
    import random

    from bench import plain_prepare
    from tasks import leakage

    monkeypatch.setattr(leakage, "TRAIN_CHUNK_ROWS", 7)  # many chunks: first twins across chunks
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    base = [" ".join(rng.choices(words, k=rng.randint(2, 25))) for _ in range(100)]
    splits, files = {}, {}
    for split, n in (("train", 400), ("validation", 100), ("test", 100)):
        splits[split] = []
        for i in range(n):
            prompt, r = rng.choice(base), rng.random()
            if r < 0.3:
                changed = prompt.split()
                changed[rng.randrange(len(changed))] = rng.choice(words)
                prompt = " ".join(changed)
            elif r < 0.4:
                prompt = prompt.upper() + "!"
            elif r < 0.7:
                prompt = " ".join(rng.choices(words, k=20))
            splits[split].append({"id": f"{split[0]}{i}", "prompt": prompt})
        files[split] = write_jsonl(tmp_path / f"{split}.jsonl", splits[split])
    found = [(x.split, x.id, x.other_split, x.other_id, x.kind, x.similarity)
             for x in leakage.find(files, threshold)]
    assert found == plain_prepare.leaks(splits, threshold)  # an LSH of every row, in memory
    assert {kind for *_, kind, _ in found} == set(leakage.KINDS)
    assert any(x[0] == "test" and x[2] == "validation" for x in found)
    assert any(x[0] == x[2] for x in found)  # a held-out row twin of an earlier one of its split


def test_sketch_rules_out_only_pairs_below_the_threshold():
    """The sketches' bound on a pair's Jaccard is never below the Jaccard itself, so no pair
    at or above the threshold is ruled out, while most pairs far below it are; buckets full
    in both sketches rule nothing out."""
    import random

    import numpy as np

    from tasks import leakage

    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    base = rng.choices(words, k=150)
    ruled_out = {0.5: 0, 0.8: 0}
    for edits in range(0, 150, 2):
        other = list(base)
        for _ in range(edits):
            other[rng.randrange(len(other))] = rng.choice(words)
        a, b = leakage.shingles(" ".join(base)), leakage.shingles(" ".join(other))
        similarity = len(a & b) / len(a | b)
        for threshold in ruled_out:
            may, = leakage._may_reach(threshold, leakage._sketch(a)[None], np.array([len(a)]),
                                      leakage._sketch(b)[None], np.array([len(b)]))
            assert may or similarity < threshold
            ruled_out[threshold] += not may
    assert ruled_out[0.8] > 60 and ruled_out[0.5] > 5  # of 72 and 64 below them, whatever the str hash
    full = np.full((1, leakage.SKETCH_BUCKETS), leakage.SKETCH_FULL, dtype=np.uint8)
    assert leakage._may_reach(0.8, full, np.array([10**6]), full, np.array([10**6]))[0]

def test_mixture_keeps_each_source_rows_of_smallest_hash(ws):
    """A row cap keeps the capped source's rows whose sha256(seed:mix:id) sort first, in
    their split files' order; an uncapped source keeps every row."""
    import hashlib

    write_jsonl(ws / "data/raw/a.jsonl", rows(150))
    write_jsonl(ws / "data/raw/b.jsonl", rows(80))
    p = params(data={"path": None, "sources": [{"path": "data/raw/a.jsonl", "label": "a", "row_cap": 37},
                                                {"path": "data/raw/b.jsonl", "label": "b"}]})
    stats = stage("prepare", p)
    out = {s: read_split(s) for s in ("train", "validation", "test")}
    ids = {r["id"] for split_rows in out.values() for r in split_rows}
    by_hash = sorted((f"a/r{i}" for i in range(150)),
                     key=lambda i: hashlib.sha256(f"{p.data.split.seed}:mix:{i}".encode()).digest())
    assert ids == set(by_hash[:37]) | {f"b/r{i}" for i in range(80)}
    for split, split_rows in out.items():
        assert [r["id"] for r in split_rows] == sorted((r["id"] for r in split_rows),
                                                      key=lambda i: (i[0], int(i.split("/r")[1])))
        assert stats["rows_per_source"]["a"][split] == sum(r["id"].startswith("a/") for r in split_rows)
    assert not list(Path("data/prepared").glob("*.unmixed"))


def test_duplicate_id_found_among_older_ids(ws, monkeypatch):
    """Ids past RECENT_IDS are kept as bucketed digests: a repeat of one is still found, naming its line."""
    from tasks import prepare

    monkeypatch.setattr(prepare, "RECENT_IDS", 3)
    write_jsonl(ws / "data/raw/dialogues.jsonl", rows(40) + rows(1, start=5) + rows(1, start=39))
    with pytest.raises(DataError, match=r"dialogues.jsonl line 41: duplicate id 'r5'"):
        stage("prepare", params())
    stats = stage("prepare", params(data={"on_bad_record": "skip"}))
    assert stats["dropped_by_reason"] == {"duplicate_id": 2} and stats["rows_out"] == 40


def test_older_ids_match_only_whole_digests():
    """A bucket is the digests end to end: bytes that equal a digest across two of them are
    no match; the digest itself, further on, is."""
    from tasks import prepare

    ids = prepare._Ids()
    ids.add("kept")
    ids.add("probe")
    ids._fold()
    probe = ids._digest("probe")
    half = prepare.ID_DIGEST_BYTES // 2
    assert ids._bucket(probe) != ids._bucket(ids._digest("kept"))
    ids.buckets[ids._bucket(probe)] = b"x" * half + probe + b"y" * half
    assert "kept" in ids and "probe" not in ids and "other" not in ids
    ids.buckets[ids._bucket(probe)] += probe
    assert "probe" in ids


def test_ids_are_found_exactly_across_folds(monkeypatch):
    """Ids folded into the digests' buckets (through the hash bitmap) and ids still recent
    are all found; ids never added are not."""
    from tasks import prepare

    monkeypatch.setattr(prepare, "RECENT_IDS", 500)
    ids = prepare._Ids()
    for i in range(5_250):
        assert f"id{i}" not in ids
        ids.add(f"id{i}")
    assert len(ids.recent) == 250
    assert all(f"id{i}" in ids for i in range(5_250))
    assert not any(f"other{i}" in ids for i in range(5_250))


def test_leakage_lookup_finds_exactly_the_keys_present():
    """The bitmap in front of a column's search turns away only absent keys: every lookup
    finds exactly the rows holding its key, in the order of the lookups."""
    import random

    import numpy as np

    from tasks import leakage

    rng = random.Random(0)
    distinct = [rng.randbytes(leakage.DIGEST_BYTES) for _ in range(3_000)]
    keys = [rng.choice(distinct) for _ in range(4_000)]
    rows: dict[bytes, list[int]] = {}
    for row, key in enumerate(keys):
        rows.setdefault(key, []).append(row)
    queries = [rng.choice(distinct) if rng.random() < 0.3 else rng.randbytes(leakage.DIGEST_BYTES)
               for _ in range(20_000)]
    column = leakage._Column(np.array(keys, dtype=leakage.DIGEST))
    found = [(i, found_rows.tolist()) for i, _, found_rows in column.lookup(queries)]
    assert found == [(i, rows[q]) for i, q in enumerate(queries) if q in rows]


def test_leakage_keys_sharing_their_first_half_are_told_apart():
    """Digests are searched by their first eight bytes, then told apart by their last eight:
    a lookup finds exactly the rows with its whole key."""
    import numpy as np

    from tasks import leakage

    def key(high: int, low: int) -> bytes:
        return high.to_bytes(8, "big") + low.to_bytes(8, "big")

    keys = [key(7, 2), key(7, 1), key(3, 0), key(7, 2), key(7, 1), key(9, 9)]
    column = leakage._Column(np.array(keys, dtype=leakage.DIGEST))
    found = {i: (start, sorted(rows.tolist()))
             for i, start, rows in column.lookup([key(7, 1), key(7, 3), key(9, 9), key(7, 2), key(5, 0)])}
    assert found == {0: (1, [1, 4]), 2: (5, [5]), 3: (3, [0, 3])}
    assert column.run_start().tolist() == [3, 1, 0, 3, 1, 5]


def test_streaming_writer_drops_pages_and_keeps_every_byte(tmp_path, monkeypatch):
    """Past the kept size, the writer flushes and has the kernel drop the file's pages every
    so many bytes; what is read back is exactly what was written."""
    from tasks import io

    monkeypatch.setattr(io, "PAGE_CACHE_KEEP_BYTES", 4096)
    monkeypatch.setattr(io, "PAGE_CACHE_DROP_BYTES", 1000)
    lines = [f"row {i} {'x' * (i % 97)}\n".encode() for i in range(3_000)]
    with io.StreamingWriter(tmp_path / "out.jsonl") as out:
        for line in lines:
            out.write(line)
        assert out._dropped > io.PAGE_CACHE_KEEP_BYTES
    assert (tmp_path / "out.jsonl").read_bytes() == b"".join(lines)


def test_streaming_lines_drop_pages_read_and_yield_every_line(tmp_path, monkeypatch):
    """A file larger than the kept size has the pages read so far dropped every so many bytes
    of lines (a gzip file's by its compressed offset); a smaller one is read as it is. Every
    line comes back, in order, either way."""
    import gzip
    import os

    from tasks import io

    monkeypatch.setattr(io, "PAGE_CACHE_KEEP_BYTES", 4096)
    monkeypatch.setattr(io, "PAGE_CACHE_DROP_BYTES", 1000)
    drops: list[int] = []
    fadvise = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: (
        drops.append(length), fadvise(fd, offset, length, advice)))
    lines = [f"row {i} {'x' * (i % 97)}\n".encode() for i in range(3_000)]
    (tmp_path / "big.jsonl").write_bytes(b"".join(lines))
    (tmp_path / "small.jsonl").write_bytes(b"".join(lines[:10]))
    with gzip.open(tmp_path / "big.jsonl.gz", "wb") as z:
        z.write(b"".join(lines))
    with (tmp_path / "big.jsonl").open("rb") as f:
        assert list(io.streaming_lines(f)) == lines
    assert len(drops) > 100 and drops == sorted(drops) and drops[-1] <= (tmp_path / "big.jsonl").stat().st_size
    drops.clear()
    with (tmp_path / "small.jsonl").open("rb") as f:
        assert list(io.streaming_lines(f)) == lines[:10]
    assert drops == []
    with gzip.open(tmp_path / "big.jsonl.gz", "rb") as f:
        assert list(io.streaming_lines(f)) == lines
    assert drops and drops[-1] <= (tmp_path / "big.jsonl.gz").stat().st_size
