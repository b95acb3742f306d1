"""The data section (data.*: sources, split, checks) and the prompt section (prompt.*)."""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from tasks import templates
from tasks.config.base import DATA_DIR, LOCAL_DATA_SUFFIXES, SPLIT_NAMES, TAG, Files, Section, data_suffix
from tasks.errors import TemplateError


class SplitConfig(Section):
    seed: int = Field(42, description=(
        "Seed of the hash split: the same seed and the same ids give the same split, whatever "
        "the row order."))
    validation_size: float = Field(0.1, ge=0, lt=1, description=(
        "Share of rows for the validation split, in [0, 1); 0: no validation split. The "
        "validation loss is computed after training (metrics/train.json), and every "
        "train.eval_steps steps when that is set."))
    test_size: float = Field(0.1, gt=0, lt=1, description=(
        "Share of rows for the test split, in (0, 1): what evaluate, export and promote score."))
    source_splits: dict[Literal["train", "validation", "test"], str] | None = Field(None, description=(
        "Hub only: use the dataset's own splits, e.g. {train: train, validation: validation, "
        "test: test} (our split: the source's). The seed and sizes then no longer decide the "
        "split; map train and test, and validation too unless validation_size is 0. For local "
        "files, give data.path as split files instead."))

    @model_validator(mode="after")
    def _sizes(self) -> SplitConfig:
        if self.validation_size + self.test_size >= 1:
            raise ValueError("validation_size + test_size must be below 1 (nothing left to train on)")
        return self


class SplitFiles(Section):
    """A dataset shipped as split files. A missing validation or test split is carved out of
    train by the hash split, with data.split's sizes."""
    train: Files = Field(description=(
        "The train split: a file under data/raw/, a glob or a list of them (read in sorted "
        "order), in any format data.path takes."))
    validation: Files | None = Field(None, description=(
        "The validation split's files; null: carved out of train by the hash split "
        "(data.split.validation_size)."))
    test: Files | None = Field(None, description=(
        "The test split's files, e.g. the official test set every published number uses; null: "
        "carved out of train by the hash split (data.split.test_size)."))

    def given(self) -> dict[str, list[str]]:
        """The splits that have files, each as a list of files or globs."""
        out = {}
        for split in SPLIT_NAMES:
            value = getattr(self, split)
            if value is not None:
                out[split] = [value] if isinstance(value, str) else value
        return out


def _path_shape(value: Any) -> str:
    shape = "split-files" if isinstance(value, dict | SplitFiles) else \
        "files" if isinstance(value, list) else "none" if value is None else "file"
    return TAG + shape


PathShapes = Annotated[SplitFiles, Tag(TAG + "split-files")] | Annotated[list[str], Tag(TAG + "files")] \
    | Annotated[str, Tag(TAG + "file")]
DataPath = Annotated[PathShapes, Discriminator(_path_shape)]
OptionalDataPath = Annotated[PathShapes | Annotated[None, Tag(TAG + "none")], Discriminator(_path_shape)]


class SourceConfig(Section):
    """One source of a mixture (data.sources); unset keys take data's and prompt's values."""
    path: DataPath = Field(description=(
        "This source's data, in any form data.path takes: a file, glob or list under data/raw/, "
        "split files, or a Hub dataset id (with revision)."))
    name: str | None = Field(None, description="This source's Hub dataset configuration (Hub only).")
    revision: str | None = Field(None, description=(
        "This source's Hub dataset tag or commit sha: required for a Hub source."))
    columns: dict[str, str] | None = Field(None, description=(
        "Template field to column name for this source; null: data.columns."))
    template: str | None = Field(None, description=(
        "This source's prompt template (a built-in name or a string with {field} "
        "placeholders); null: prompt.template."))
    completion: str | None = Field(None, description=(
        "This source's completion template, with a custom template; null: prompt.completion."))
    weight: float | None = Field(None, gt=0, description=(
        "This source's share of the mixture, relative to the other weighted sources; give a "
        "weight or a row_cap, not both (neither: all its rows). The mixture is the largest with "
        "these shares that repeats no row: 3:1 over 300 and 200 rows takes 300 and 100. It "
        "applies to the whole source, choosing rows by a hash of (split.seed, id), so a rerun "
        "keeps the same rows; each split gets its hash share of the rows kept."))
    row_cap: int | None = Field(None, ge=1, description=(
        "Take at most this many rows of this source (chosen by a hash of split.seed and the "
        "id); give a row_cap or a weight, not both."))
    label: str | None = Field(None, pattern=r"^[^/]+$", description=(
        "This source's name in metrics/prepare.json (rows_per_source) and in row ids "
        "(<label>/<id>, so sources may reuse ids); null: source0, source1, ... No '/' in it."))

    @model_validator(mode="after")
    def _one_limit(self) -> SourceConfig:
        if self.weight is not None and self.row_cap is not None:
            raise ValueError("give a source a weight or a row_cap, not both")
        return self


class DataConfig(Section):
    path: OptionalDataPath = Field(None, description=(
        "The data: a file under data/raw/, a glob or a list of them, {train, validation, test} "
        "split files, or a Hub dataset id; null with data.sources. Local formats: .jsonl (one "
        "JSON object per line; also gzip .jsonl.gz and zstd .jsonl.zst), .json (a list of "
        "objects), .csv/.tsv (header row) and .parquet. A glob (data/raw/part-*.jsonl) or a "
        "list is read as one source, files in sorted order. A split left out of split files is "
        "carved out of train by the hash split."))
    name: str | None = Field(None, description=(
        "Hub dataset configuration (datasets.load_dataset's name); Hub only."))
    revision: str | None = Field(None, description=(
        "Hub dataset tag or commit sha: required for Hub datasets. A branch such as main "
        "passes the check but moves on the Hub, and DVC sees only this string: pin a tag or a "
        "commit."))
    columns: dict[str, str] = Field({}, description=(
        "Template field to column name in your data, e.g. {dialogue: text}; unmapped fields "
        "use their own name."))
    id_column: str | None = Field("id", description=(
        "Column holding a unique row id, used for the split and the duplicate check; null: "
        "none. Rows are then named row0, row1, ... and split by a hash of their rendered "
        "content."))
    split: SplitConfig = Field(SplitConfig(), description=(
        "How rows are split into train, validation and test: by a hash of each row's id."))
    max_rows: int | None = Field(None, ge=1, description=(
        "Read only the first N rows of each source split, for quick trials; null: all. With "
        "source_splits, N counts across the splits in the order listed."))
    on_bad_record: Literal["error", "skip"] = Field("error", description=(
        "error: stop at the first bad record, naming its file and line; skip: drop it and count "
        "why in metrics/prepare.json. Bad records: malformed JSON, invalid UTF-8, a missing "
        "field or id, a duplicate id, a wrong type, an empty completion, an unknown label."))
    on_leakage: Literal["warn", "drop", "error"] = Field("warn", description=(
        "What prepare does with a validation/test row whose prompt repeats one of an earlier "
        "split: warn, drop or error. With warn it logs and counts them; drop removes them from "
        "validation/test (train is never touched); error stops, naming the rows. A repeat is "
        "exact, normalized (equal once case, whitespace and punctuation are ignored) or near "
        "(see leakage_threshold), under "
        "another id. Counts per kind and split go to metrics/prepare.json under leakage (and "
        "to the Prefect artifact data-leakage)."))
    leakage_threshold: float = Field(0.8, gt=0, le=1, description=(
        "Near-duplicate threshold: the Jaccard similarity of two prompts' word 3-grams at or "
        "above which a held-out row counts as leaked. Candidates come from MinHash LSH "
        "(datasketch, fixed seed: deterministic), their similarity is then computed exactly. "
        "At 0.8, changing one word in forty still counts."))
    allow_external_links: bool = Field(False, description=(
        "Follow symlinks under data/raw/ and models/ that point outside the repository (each "
        "one is logged). Off: such a link stops the stage, since DVC would version a file the "
        "repository does not hold."))
    delimiter: str | None = Field(None, min_length=1, max_length=1, description=(
        "The field separator of .csv/.tsv files, one character such as ';'; null: ',' for "
        ".csv, a tab for .tsv."))
    references: list[str] | None = Field(None, min_length=1, description=(
        "Columns holding a test row's reference texts, e.g. [summary1, summary2, summary3]; "
        "null: the completion. Each column holds a text or a list of texts, and evaluate scores "
        "a prediction against its best reference. With null, a completion field that holds a "
        "list of texts gives each item as a reference (the first is what training learns). "
        "Needs a text template whose completion has exactly one {field}."))
    sources: list[SourceConfig] | None = Field(None, min_length=1, description=(
        "A mixture of several sources instead of data.path (set path: null); null: the one "
        "source data.path names. Each source has its own path and optionally columns, "
        "template, label and a weight or row_cap; id_column, delimiter, references and split "
        "are shared by all of them."))

    @property
    def is_local(self) -> bool:
        return self.path is not None and (not isinstance(self.path, str) or is_local_path(self.path))

    def source(self, index: int) -> DataConfig:
        """data as source `index` of the mixture sees it (validated like data itself)."""
        src = (self.sources or [])[index]
        return DataConfig.model_validate({
            **self.model_dump(exclude={"sources"}), "path": src.model_dump()["path"], "name": src.name,
            "revision": src.revision, "columns": self.columns if src.columns is None else src.columns})

    def local_sources(self) -> list[tuple[str | None, list[str]]]:
        """(fixed split, or None for the hash split; files or globs) per local source."""
        assert self.path is not None, "a mixture's parts each have a path (DataConfig.source)"
        if isinstance(self.path, SplitFiles):
            return list(self.path.given().items())
        return [(None, [self.path] if isinstance(self.path, str) else self.path)]

    @property
    def hash_splits(self) -> set[str]:
        """The splits the hash split fills: all of them, or those no split file gives."""
        given = self.path.given() if isinstance(self.path, SplitFiles) else {}
        return {s for s in SPLIT_NAMES if s == "train" or s not in given}

    @model_validator(mode="after")
    def _source(self) -> DataConfig:
        if (self.path is None) == (self.sources is None):
            raise ValueError("give data.path (one source) or data.sources (a mixture), not both")
        if self.sources is not None:
            # Deferred: describe's suggestions for unknown keys walk Params, which holds this model.
            from tasks.config.loading import describe

            # Each source carries its own: data's would be ignored in silence.
            problems = [f"{key}: {getattr(self, key)!r} is not read with data.sources, where each "
                        f"source has its own (sources.N.{key}): move it there, and set {key}: null here"
                        for key in HUB_ONLY_KEYS if getattr(self, key) is not None]
            for i, src in enumerate(self.sources):
                try:
                    self.source(i)
                    if src.template is not None:
                        PromptConfig(template=src.template, completion=src.completion)
                except ValidationError as err:
                    problems += [f"sources.{i}: {p}" for p in describe(err)]
            labels = [s.label for s in self.sources if s.label is not None]
            if len(set(labels)) != len(labels):
                problems.append("sources: two sources have the same label")
            if problems:
                raise ValueError("\n".join(problems))
            return self
        if self.is_local:
            for split, files in self.local_sources():
                key = "path" if split is None else f"path.{split}"
                if not files:
                    raise ValueError(f"{key}: name at least one file")
                for f in files:
                    if (problem := local_data_problem(f)) is not None:
                        raise ValueError(f"{key}: {problem}")
            # prepare reads local files as they are: a Hub-only key would be ignored in silence.
            for key, what in HUB_ONLY_KEYS.items():
                if (value := getattr(self, key)) is not None:
                    raise ValueError(f"{key}: {value!r} is {what}, but path names local files, which "
                                     f"have none (nothing would read it): set {key}: null")
            if self.split.source_splits:
                raise ValueError("split.source_splits needs a Hub dataset; for local files give "
                                 "path as {train: ..., validation: ..., test: ...}")
        elif self.revision is None:
            raise ValueError(f"{self.path!r} is read from the Hugging Face Hub: pin `revision` "
                             "(a tag or commit sha) so reruns read the same data")
        return self


# The keys that mean something for a Hub dataset only: key -> what it is, in a message.
HUB_ONLY_KEYS = {"name": "a Hub dataset configuration", "revision": "a Hub dataset tag or commit"}


def is_local_path(path: str) -> bool:
    """Whether data.path names local data rather than a Hub dataset id: a data file's
    format, or anything a Hub id cannot be (absolute, '.', under data/raw/, or on disk)."""
    p = Path(path)
    return data_suffix(path) is not None or p.is_absolute() or path.startswith(".") \
        or p.parts[:2] == DATA_DIR.parts or os.path.lexists(path)


def path_kind(path: Path, follow: bool = True) -> str | None:
    """What is at `path`, in words ("a folder", "a FIFO (named pipe)", ...); None when
    nothing is. Only stats it: a FIFO is not opened, which would block."""
    try:
        mode = (path.stat() if follow else path.lstat()).st_mode
    except FileNotFoundError:
        return "a broken symlink" if follow and path.is_symlink() else None
    except OSError:
        return None  # unreadable: the reader reports it
    kinds = ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device file"), (stat.S_ISBLK, "a device file"))
    return next((name for test, name in kinds if test(mode)), "a file")


def local_data_problem(f: str) -> str | None:
    """Why local data file (or glob) `f` cannot be read as data.path, or None. Only what is
    under data/raw/ is read: DVC tracks that folder, and nothing is read through `datasets`
    from a path elsewhere."""
    p = Path(f)
    if p.is_absolute() or ".." in p.parts or p.parts[:2] != DATA_DIR.parts:
        what = path_kind(p, follow=False) or "a path"
        return (f"local data must be under {DATA_DIR}/, and {f!r} is a local {what.removeprefix('a ')} "
                f"outside it: copy the data into {DATA_DIR}/ (the folder DVC tracks) and name it there")
    if not glob.has_magic(f) and p.is_dir():
        return f"{f!r} is a folder: name its files, e.g. '{f.rstrip('/')}/*.jsonl'"
    if data_suffix(f) is None:
        return f"{f!r} is not a format prepare reads ({', '.join(LOCAL_DATA_SUFFIXES)})"
    return None


class PromptConfig(Section):
    template: str = Field("dialogue_summary", description=(
        "A built-in template (dialogue_summary, instruction, question_answer, "
        "text_classification, chat) or your own string with {field} placeholders. "
        "Placeholders are plain field names only: no attributes, indexing, format specs or "
        "expressions, so a template cannot run code; write {{ and }} for literal braces."))
    completion: str | None = Field(None, description=(
        "Completion template, e.g. ' {answer}': required with a custom template, refused with "
        "a built-in."))

    @model_validator(mode="after")
    def _template(self) -> PromptConfig:
        if self.template in templates.TEMPLATE_NAMES:
            if self.completion is not None:
                raise ValueError(f"completion is fixed by the built-in template {self.template!r}; "
                                 "remove it or write a custom template")
            return self
        if "{" not in self.template:
            raise ValueError(f"template {self.template!r} is neither a built-in "
                             f"({', '.join(templates.TEMPLATE_NAMES)}) nor has {{field}} placeholders")
        if self.completion is None:
            raise ValueError("a custom template needs `completion` too (e.g. ' {answer}')")
        try:
            templates.parse(self.template)
            templates.parse(self.completion)
        except TemplateError as err:
            raise ValueError(str(err)) from None
        return self

    @property
    def fields(self) -> list[str]:
        if self.template == templates.CHAT:
            return ["messages"]
        tpl = templates.resolve(self.template, self.completion)
        alternatives = "".join(tpl.prompt_when_empty.values())
        return list(dict.fromkeys(templates.fields_of(tpl.prompt + alternatives + tpl.completion)))


def reference_field(prompt: PromptConfig) -> str | None:
    """The one field a text template's completion is made of (its reference text), if any."""
    if prompt.template == templates.CHAT:
        return None
    names = set(templates.fields_of(templates.resolve(prompt.template, prompt.completion).completion))
    return names.pop() if len(names) == 1 else None

