"""prepare: render raw records through the prompt template into prompt/completion pairs,
and split them deterministically into train/validation/test.

Reads `data.*` and `prompt.*` (one local file, a glob or list of files, {train, validation,
test} split files, or a Hub dataset; or a mixture of such sources, data.sources); writes data/prepared/{train,validation,test}.jsonl
(rows: {id, prompt, completion}; for sequence_classification the completion is the class
name; test rows with several references add `references`, a list of texts; train and
validation rows of prompt.template chat add `messages`, the whole conversation) and
metrics/prepare.json (rows in, out, dropped and why).

    finetune prepare
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from tasks import leakage, templates
from tasks.config import Params, PromptConfig
from tasks.errors import DataError
from tasks.io import atomic_path, write_json, write_jsonl
from tasks.records import BadRecord, Record, local_files, read_files, split_of, to_example
from tasks.workspace import SPLITS, Workspace

log = logging.getLogger("finetune.prepare")

def _hub(params: Params, split: str) -> Iterator[Record]:
    import datasets

    d = params.data
    try:
        ds = datasets.load_dataset(d.path, d.name, revision=d.revision, split=split)
    except Exception as err:  # network, missing revision, missing split: all user-fixable
        raise DataError(f"data.path: cannot load Hub dataset {d.path!r} (revision {d.revision}, "
                        f"split {split!r}): {err}") from None
    for number, record in enumerate(ds):
        yield f"{d.path}[{split}] row {number}", record, None


def _sources(params: Params) -> list[tuple[str | None, Iterator[Record]]]:
    """(fixed split or None, records) for each source the data comes from."""
    d = params.data
    if d.is_local:
        # Every file is checked before any is read: a typo in test's glob fails at once.
        sources = [(split, local_files(patterns, "data.path" if split is None else f"data.path.{split}"))
                   for split, patterns in d.local_sources()]
        # Train's rows go through the hash split, which fills only the splits no file gives.
        return [(None if split == "train" else split, read_files(files, d)) for split, files in sources]
    if d.split.source_splits:
        return [(ours, _hub(params, theirs)) for ours, theirs in d.split.source_splits.items()]
    return [(None, _hub(params, "train"))]


def _parts(params: Params) -> list[tuple[str | None, Params]]:
    """(label, params as the source sees them) per source; one unlabelled part without a mixture."""
    d = params.data
    if d.sources is None:
        return [(None, params)]
    parts = []
    for i, src in enumerate(d.sources):
        prompt = params.prompt if src.template is None else \
            PromptConfig(template=src.template, completion=src.completion)
        parts.append((src.label or f"source{i}",
                      params.model_copy(update={"data": d.source(i), "prompt": prompt})))
    return parts


def _mix(params: Params, splits: dict[str, list[dict[str, Any]]], labels: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The splits after each source's weight or row cap, which apply to the whole source (its
    splits keep their proportions through the hash split). Rows are chosen by a hash of
    (seed, id), so the same data and seed keep the same rows; kept rows keep their order."""
    d = params.data
    by_source: dict[str, list[str]] = {label: [] for label in labels}
    for rows in splits.values():
        for row in rows:
            by_source[row["id"].split(MIX_SEPARATOR, 1)[0]].append(row["id"])
    for ids in by_source.values():
        ids.sort(key=lambda i: hashlib.sha256(f"{d.split.seed}:mix:{i}".encode()).digest())
    sources = dict(zip(labels, d.sources or [], strict=True))
    weighted = {label: src.weight for label, src in sources.items() if src.weight is not None}
    total = sum(weighted.values())
    # The largest mixture with these shares that takes no row twice.
    size = min((len(by_source[label]) / (w / total) for label, w in weighted.items()), default=0.0)
    keep: set[str] = set()
    for label, src in sources.items():
        n = len(by_source[label])
        if src.weight is not None:
            n = min(n, int(size * src.weight / total + MIX_ROUNDING))
        elif src.row_cap is not None:
            n = min(n, src.row_cap)
        keep.update(by_source[label][:n])
    return {split: [row for row in rows if row["id"] in keep] for split, rows in splits.items()}


# A mixture's row ids are "<source label>/<id>": sources may reuse each other's ids.
MIX_SEPARATOR = "/"
# Shares are floored; this absorbs float error (0.3 * 10 / 0.3 is 9.999...).
MIX_ROUNDING = 1e-9


def run(params: Params, ws: Workspace) -> dict[str, Any]:
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    dropped: Counter[str] = Counter()
    seen_ids: set[str] = set()
    rows_in = 0
    tokenizer = None
    parts = _parts(params)
    for label, part in parts:
        d = part.data
        tpl = None if part.prompt.template == templates.CHAT else \
            templates.resolve(part.prompt.template, part.prompt.completion)
        if tpl is None and tokenizer is None:
            from tasks.modeling import load_tokenizer

            tokenizer = load_tokenizer(params.model)
        prefix = "" if label is None else f"{label}{MIX_SEPARATOR}"
        for fixed_split, records in _sources(part):
            for number, (where, record, bad) in enumerate(records):
                if d.max_rows is not None and number >= d.max_rows:
                    break
                rows_in += 1
                try:
                    if bad is not None:
                        reason, _, message = bad.partition(": ")
                        raise BadRecord(reason, f"{where}: {message}")
                    assert record is not None
                    example = to_example(part, tpl, tokenizer, where, record)
                    if d.id_column is None:
                        row_id = f"{prefix}row{rows_in - 1}"
                        # The rendered pair alone, as before chats kept their messages:
                        # a row keeps the split it had.
                        key = json.dumps({k: v for k, v in example.items() if k != "messages"},
                                         sort_keys=True)
                    else:
                        if record.get(d.id_column) is None:
                            raise BadRecord("missing_id", f"{where}: missing id column {d.id_column!r} "
                                            "(set data.id_column: null if your data has none)")
                        row_id = key = prefix + str(record[d.id_column])
                        if row_id in seen_ids:
                            raise BadRecord("duplicate_id", f"{where}: duplicate id {row_id!r}")
                    seen_ids.add(row_id)
                except BadRecord as err:
                    if d.on_bad_record == "error":
                        raise DataError(f"{err} (set data.on_bad_record: skip to drop such records)") from None
                    dropped[err.reason] += 1
                    log.warning("skipped %s", err)
                    continue
                split = fixed_split or split_of(key, part)
                if split != "test":
                    example.pop("references", None)  # only evaluate reads them
                else:
                    example.pop("messages", None)  # evaluate generates the last turn from the prompt
                splits[split].append({"id": row_id, **example})
    d = params.data
    if rows_in == 0:
        raise DataError(f"data.path: {d.path} has no records" if d.sources is None else
                        "data.sources: no source has records")
    labels = [label for label, _ in parts if label is not None]
    if labels:
        splits = _mix(params, splits, labels)
    leaked = leakage.check(splits, d)
    if leaked["dropped"]:
        dropped["leakage"] += leaked["dropped"]
    for split, rows in splits.items():
        if not rows and (split != "validation" or d.split.validation_size > 0):
            raise DataError(f"the {split} split is empty ({rows_in} rows read, "
                            f"{sum(dropped.values())} dropped): add data or change data.split")
    with atomic_path(ws.prepared) as tmp:
        tmp.mkdir()
        for split, rows in splits.items():
            write_jsonl(tmp / f"{split}.jsonl", rows)
    stats: dict[str, Any] = {
        "rows_in": rows_in, "rows_out": sum(len(r) for r in splits.values()),
        "rows_dropped": sum(dropped.values()), "dropped_by_reason": dict(sorted(dropped.items())),
        "rows_per_split": {s: len(r) for s, r in splits.items()}, "leakage": leaked}
    if labels:
        stats["rows_per_source"] = {label: {s: sum(r["id"].startswith(label + MIX_SEPARATOR) for r in rows)
                                            for s, rows in splits.items()} for label in labels}
    write_json(ws.metrics("prepare"), stats)
    log.info("prepared %s", stats)
    return stats
