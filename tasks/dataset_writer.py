"""Write a `datasets` save_to_disk folder batch by batch, so a split larger than memory
streams to disk and `datasets.load_from_disk` reads it as usual.

The bytes are the ones `Dataset.from_dict(rows).save_to_disk(path)` writes for the same rows
(tests/test_tokenize.py holds them equal): datasets' own ArrowWriter, record batches of
`DEFAULT_MAX_BATCH_SIZE` rows, shards of at most `MAX_SHARD_SIZE` named
data-0000i-of-0000N.arrow, then state.json and dataset_info.json. How many shards there are
depends on the total size, known only at the end: the rows go to one file first, which
becomes the only shard or, past MAX_SHARD_SIZE, is streamed into the shards.

    writer = DatasetWriter(folder, features)
    for columns in batches:            # a dict of column lists
        writer.write(columns)
    writer.close(fingerprint)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHARD = "data-{index:05d}-of-{count:05d}.arrow"  # save_to_disk's shard file names
STREAM = "rows.arrow.partial"  # every row, before the shard count is known
# Arrow writes a sliced array's buffers rounded up to 64 bytes with the bytes that follow
# the slice. save_to_disk's record batches are slices of one table, so each carries up to 63
# bytes of the rows after it; each batch here is cut from a table that holds this many rows
# more (every row has at least one byte in each column: a non-empty id, one token or more).
LOOKAHEAD_ROWS = 64


class DatasetWriter:
    def __init__(self, path: Path, features: Any, max_shard_size: int | str | None = None):
        from datasets import config
        from datasets.arrow_writer import ArrowWriter

        self.path, self.features = Path(path), features
        self.max_shard_size = max_shard_size or config.MAX_SHARD_SIZE
        self.batch_rows = config.DEFAULT_MAX_BATCH_SIZE
        self.path.mkdir(parents=True, exist_ok=True)
        self._writer = ArrowWriter(features=features, path=str(self.path / STREAM), embed_local_files=True)
        self._pending: dict[str, list] = {name: [] for name in features}

    def _pending_rows(self) -> int:
        return len(next(iter(self._pending.values())))

    def write(self, columns: dict[str, list]) -> None:
        """Adds rows; they are written in record batches of `batch_rows`, as save_to_disk's are."""
        for name, values in columns.items():
            self._pending[name] += values
        while self._pending_rows() >= self.batch_rows + LOOKAHEAD_ROWS:
            self._flush(self.batch_rows)

    def _flush(self, n: int) -> None:
        import pyarrow as pa

        table = pa.Table.from_pydict({name: values[:n + LOOKAHEAD_ROWS] for name, values in self._pending.items()},
                                     schema=self.features.arrow_schema)
        self._writer.write_table(table.slice(0, n))
        self._pending = {name: values[n:] for name, values in self._pending.items()}

    def close(self, fingerprint: str) -> None:
        """Writes what is left, lays the rows out in shards, and writes state.json and
        dataset_info.json (`fingerprint` is the dataset's, in state.json)."""
        from datasets import DatasetInfo, Features, Value, config
        from datasets.arrow_writer import get_writer_batch_size_from_data_size
        from datasets.utils.py_utils import asdict, convert_file_size_to_int

        while rest := self._pending_rows():
            self._flush(min(rest, self.batch_rows))
        rows, nbytes = self._writer.finalize()
        self._writer.close()
        # save_to_disk's own rules for the shard count and the record batch size.
        count = min(rows, int(nbytes / convert_file_size_to_int(self.max_shard_size)) + 1)
        batch_rows = self.batch_rows
        if nbytes > 0:
            batch_rows = min(batch_rows, get_writer_batch_size_from_data_size(rows, nbytes))
        stream = self.path / STREAM
        if rows == 0:
            # What Dataset.from_dict infers from empty columns, and save_to_disk's zero shards.
            self.features = Features({name: Value("null") for name in self.features})
            stream.unlink()
        elif count == 1 and batch_rows == self.batch_rows:
            stream.rename(self.path / SHARD.format(index=0, count=1))
        else:
            self._reshard(stream, rows, count, batch_rows)
        state = {"_data_files": [{"filename": SHARD.format(index=i, count=count)} for i in range(count)],
                 "_fingerprint": fingerprint, "_format_columns": None, "_format_kwargs": {},
                 "_format_type": None, "_output_all_columns": False, "_split": None}
        with (self.path / config.DATASET_STATE_JSON_FILENAME).open("w", encoding="utf-8") as f:
            json.dump(state, f, indent=2, sort_keys=True)
        info = asdict(DatasetInfo(features=self.features))
        with (self.path / config.DATASET_INFO_FILENAME).open("w", encoding="utf-8") as f:
            json.dump({key: info[key] for key in sorted(info)}, f, indent=2)

    def _reshard(self, stream: Path, rows: int, count: int, batch_rows: int) -> None:
        """Streams the rows into `count` contiguous shards of record batches of `batch_rows`,
        as Dataset.shard(contiguous=True) cuts them. The file is read without a memory map,
        so the process holds a few batches, not the file."""
        import pyarrow as pa
        from datasets.arrow_writer import ArrowWriter

        div, mod = divmod(rows, count)
        with pa.OSFile(str(stream)) as source:
            source_rows = _Rows(pa.ipc.open_stream(source))
            for index in range(count):
                shard_rows = div + (1 if index < mod else 0)
                writer = ArrowWriter(features=self.features, embed_local_files=True,
                                     path=str(self.path / SHARD.format(index=index, count=count)))
                for start in range(0, shard_rows, batch_rows):
                    writer.write_table(source_rows.take(min(batch_rows, shard_rows - start)))
                writer.finalize()
                writer.close()
        stream.unlink()


class _Rows:
    """The rows of an Arrow stream, taken `n` at a time, each time as a slice of one
    contiguous table that holds LOOKAHEAD_ROWS more."""

    def __init__(self, reader: Any):
        self.reader, self.table, self.done = reader, None, False

    def take(self, n: int) -> Any:
        import pyarrow as pa

        batches = self.table.to_batches() if self.table is not None else []
        have = sum(b.num_rows for b in batches)
        while have < n + LOOKAHEAD_ROWS and not self.done:
            try:
                batches.append(self.reader.read_next_batch())
                have += batches[-1].num_rows
            except StopIteration:
                self.done = True
        table = pa.Table.from_batches(batches, schema=self.reader.schema).combine_chunks()
        self.table = table.slice(n)
        return table.slice(0, n)
