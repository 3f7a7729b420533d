"""Deep Lake v4 datasets: ingest any source once, then stream only the columns a stage needs.

Every dataset a stage reads is a Deep Lake v4 dataset. Sources are materialised under
`<storage_root>/datasets/<kind>-<split>-<fingerprint>/`, written to a temporary directory and renamed into
place, so a crash never leaves a half-written dataset that a later run would trust.

Sources:
- `sample`: the project's generated data (rlhf_lib.data.sample), train and held-out pools kept apart.
- `*.jsonl`, `*.jsonl.gz`, `*.parquet`: a local file in the kind's schema.
- a Deep Lake URI: a local directory, `file://`, `hub://`, `al://`, `s3://`, `gcs://`. Deep Lake v3 datasets
  (the seed's genai360 datasets are v3) are read through `deeplake.query`, which understands both formats.

When `eval_source` is empty, the first `eval_rows` rows of `source` are the held-out split and training data
starts after them: a deterministic carve that needs no shuffle of a multi-million-row stream.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import uuid
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

from rlhf_lib.data import sample

# Columns a stage needs (required) and the ones it keeps when present (optional), per dataset kind.
SCHEMAS: dict[str, dict[str, list[str]]] = {
    "sft": {"required": ["question", "response"], "optional": ["system_prompt"]},
    "preference": {"required": ["chosen", "rejected"], "optional": []},
    "prompts": {"required": ["instruction"], "optional": ["input", "output"]},
}
# `format` shorthands: per kind, this kind's column -> the source columns it is built from (joined by newlines,
# empty parts skipped). A kind a format leaves out cannot take that format; an empty mapping is the identity.
FORMATS: dict[str, dict[str, dict[str, list[str]]]] = {
    "alpaca": {"sft": {"question": ["instruction", "input"], "response": ["output"]}, "prompts": {}},
    "openorca": {"sft": {}, "prompts": {"instruction": ["question"], "output": ["response"]}},
    "hh": {"preference": {}},
}
REMOTE_PREFIXES = ("hub://", "al://", "s3://", "gcs://", "gs://", "azure://", "az://")
DONE_MARKER = ".rlhf_complete"


class DataError(ValueError):
    """A dataset source that cannot be used; the message names the source and the fix."""


def source_kind(source: str) -> str:
    if source == "sample":
        return "sample"
    if source.startswith(REMOTE_PREFIXES):
        return "remote_lake"
    lowered = source.lower()
    if lowered.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        return "jsonl"
    if lowered.endswith(".parquet"):
        return "parquet"
    return "local_lake"


def _local_path(source: str) -> Path:
    return Path(source.removeprefix("file://")).expanduser()


# ---------------------------------------------------------------- reading sources


def _read_jsonl(path: Path) -> Iterator[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({err}); fix or remove that line") from None


def _read_parquet(path: Path, columns: list[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    present = [c for c in columns if c in pf.schema_arrow.names]
    for batch in pf.iter_batches(columns=present, batch_size=1024):
        yield from batch.to_pylist()


def _lake_columns(ds) -> list[str]:
    return [c.name for c in ds.schema.columns]


def _open_lake(source: str):
    """Open a Deep Lake dataset read-only: v4 directly, a v3 one (genai360) through the query engine."""
    import deeplake

    uri = source if source.startswith(REMOTE_PREFIXES) or source.startswith("file://") else str(_local_path(source))
    try:
        return deeplake.open_read_only(uri)
    except Exception as err:  # v3 datasets are readable only through deeplake.query
        if not source.startswith(REMOTE_PREFIXES):
            raise DataError(f"cannot open Deep Lake dataset {source!r}: {err}") from None
        try:
            return deeplake.query(f'SELECT * FROM "{source}"')
        except Exception as err2:
            raise DataError(
                f"cannot read Deep Lake dataset {source!r}: {err2}. Remote datasets need network access "
                "(and ACTIVELOOP_TOKEN for private ones); offline, use `sample` or a local file"
            ) from None


def _read_lake(source: str, columns: list[str], batch_size: int = 512) -> Iterator[dict]:
    ds = _open_lake(source)
    present = [c for c in columns if c in _lake_columns(ds)]
    view = ds.query("SELECT " + ", ".join(f'"{c}"' for c in present))
    for batch in view.batches(batch_size):
        cols = {c: _as_list(batch[c]) for c in present}
        for i in range(len(cols[present[0]])):
            # Deep Lake reads an empty text cell back as None.
            yield {c: "" if cols[c][i] is None else cols[c][i] for c in present}


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def source_columns(source: str) -> list[str]:
    """Column names a source offers (first row for JSONL), without reading it all."""
    kind = source_kind(source)
    if kind == "jsonl":
        first = next(_read_jsonl(_local_path(source)), None)
        return list(first) if first else []
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(_local_path(source)).schema_arrow.names)
    return _lake_columns(_open_lake(source))


def source_rows(source: str) -> int | None:
    """How many rows a local source holds (cheap: metadata or one pass over a file); None for remote datasets."""
    kind = source_kind(source)
    if kind == "jsonl":
        return sum(1 for _ in _read_jsonl(_local_path(source)))
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(_local_path(source)).metadata.num_rows
    if kind == "local_lake":
        return len(_open_lake(source))
    return None


def train_rows(cfg_source, sample_rows: int) -> int | None:
    """Rows the train split of a dataset section will hold (`materialise`'s arithmetic), None when unknown."""
    if cfg_source.source == "sample":
        return cfg_source.max_rows or sample_rows
    total = source_rows(cfg_source.source)
    if total is None:
        return None
    rows = max(0, total - (0 if cfg_source.eval_source else cfg_source.carved_eval_rows))
    return min(rows, cfg_source.max_rows) if cfg_source.max_rows else rows


def column_map(kind: str, fmt: str = "", columns: dict | None = None) -> dict[str, list[str]]:
    """This kind's column -> the source columns it is read from: identity, then `fmt`'s shorthand, then
    `columns`. Mapping an SFT `question` to `instruction` also appends Alpaca's `input` when a row has one."""
    schema = SCHEMAS[kind]
    mapping = {c: [c] for c in schema["required"] + schema["optional"]}
    mapping.update({k: list(v) for k, v in FORMATS.get(fmt, {}).get(kind, {}).items()} if fmt else {})
    for ours, theirs in (columns or {}).items():
        mapping[ours] = [theirs] if isinstance(theirs, str) else list(theirs)
        if kind == "sft" and ours == "question" and mapping[ours] == ["instruction"]:
            mapping[ours].append("input")
    return mapping


def _join(row: dict, parts: list[str]) -> str:
    """One column's value as it is (hh transcripts keep their leading break); several joined by newlines."""
    values = [row.get(c) for c in parts]
    if len(values) == 1:
        return "" if values[0] is None else str(values[0])
    return "\n".join(str(v).strip() for v in values if v is not None and str(v).strip())


def read_source(source: str, kind: str, mapping: dict[str, list[str]] | None = None) -> Iterator[dict]:
    """Rows of a non-sample source with the kind's columns (missing optional ones filled with ''), each read
    from the source columns `mapping` names (see column_map)."""
    schema = SCHEMAS[kind]
    mapping = mapping or column_map(kind)
    wanted = list(dict.fromkeys(c for parts in mapping.values() for c in parts))
    skind = source_kind(source)
    if skind == "jsonl":
        rows: Iterable[dict] = _read_jsonl(_local_path(source))
    elif skind == "parquet":
        rows = _read_parquet(_local_path(source), wanted)
    else:
        rows = _read_lake(source, wanted)
    for lineno, row in enumerate(rows, 1):
        missing = [mapping[c][0] for c in schema["required"] if mapping[c][0] not in row]
        if missing:
            raise DataError(
                f"{source} row {lineno} lacks column(s) {missing}; a {kind} dataset needs {schema['required']}"
            )
        yield {c: _join(row, parts) for c, parts in mapping.items()}


# ---------------------------------------------------------------- materialising


def _fingerprint(*parts) -> str:
    """Keys a materialised dataset by everything it came from, so a changed input never reuses a stale copy."""
    h = hashlib.sha256()
    if "sample" in parts:  # the generator's code is an input too
        h.update(Path(sample.__file__).read_bytes())
    for p in parts:
        h.update(repr(p).encode())
        if isinstance(p, str) and source_kind(p) in ("jsonl", "parquet") and _local_path(p).exists():
            st = _local_path(p).stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def _write_lake(path: Path, rows: Iterable[dict], columns: list[str], batch: int = 1024,
                numeric: tuple[str, ...] = (), progress=None) -> int:
    """Write rows into a new Deep Lake dataset at `path` atomically; returns the row count. Columns are text,
    except those named in `numeric` (float32). `progress` (rlhf_lib/progress.py) is told the rows written."""
    import deeplake

    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        ds = deeplake.create(f"file://{tmp}")
        for c in columns:
            ds.add_column(c, deeplake.types.Float32() if c in numeric else deeplake.types.Text())
        count = 0
        it = iter(rows)
        while chunk := list(islice(it, batch)):
            ds.append({c: [r[c] for r in chunk] for c in columns})
            count += len(chunk)
            if progress is not None:
                progress.update(count)
        ds.commit(f"ingest {count} rows")
        del ds
        (tmp / DONE_MARKER).write_text(json.dumps({"rows": count, "columns": columns}))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written survives a bad row or a crash
        raise
    if path.exists():  # a concurrent ingest got there first; theirs is complete (it has the marker)
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    return count


def materialise(kind: str, cfg_source, split: str, storage_root: Path, seed: int, sample_rows: int) -> dict:
    """Make sure the `split` ('train' or 'eval') of a dataset exists as a local Deep Lake dataset.

    Returns {"uri", "rows", "columns", "source"}; reuses an earlier complete ingest of the same inputs.
    """
    schema = SCHEMAS[kind]
    columns = schema["required"] + schema["optional"]
    src, eval_src = cfg_source.source, cfg_source.eval_source
    if split == "eval":
        source = eval_src or src
        # An eval_source is used whole unless eval_rows caps it; otherwise the held-out rows are carved.
        n, skip = (cfg_source.eval_rows if eval_src else cfg_source.carved_eval_rows), 0
    else:
        source = src
        n = cfg_source.max_rows or (sample_rows if src == "sample" else 0)
        skip = 0 if (eval_src or src == "sample") else cfg_source.carved_eval_rows
    mapping = column_map(kind, cfg_source.format, cfg_source.columns)
    fp = _fingerprint(kind, split, source, n, skip, seed, sample_rows if source == "sample" else None,
                      None if source == "sample" else sorted(mapping.items()))
    path = storage_root / "datasets" / f"{kind}-{split}-{fp}"
    if not (path / DONE_MARKER).exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if source == "sample":
            rows: Iterable[dict] = sample.GENERATORS[kind](n, split, seed)
            rows = ({c: r.get(c, "") for c in columns} for r in rows)
        else:
            rows = read_source(source, kind, mapping)
            rows = islice(rows, skip, skip + n if n else None)
        from rlhf_lib.progress import Progress

        count = _write_lake(path, rows, columns, progress=Progress(f"data {kind}/{split}", n or None, unit="row",
                                                                     record=False))
        if count == 0:
            raise DataError(f"{kind} {split} split from {source!r} is empty; point data.{kind} at rows")
    meta = json.loads((path / DONE_MARKER).read_text())
    return {"uri": str(path), "rows": meta["rows"], "columns": meta["columns"], "source": source}


def write_rows(path: Path, rows: list[dict], columns: list[str], numeric: tuple[str, ...] = ()) -> dict:
    """Rows a stage produced (ReST's grown sets, RLAIF's judged pairs) as a Deep Lake dataset, atomically."""
    path = Path(path)
    if not (path / DONE_MARKER).exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_lake(path, rows, columns, numeric=numeric)
    meta = json.loads((path / DONE_MARKER).read_text())
    return {"uri": str(path.resolve()), "rows": meta["rows"], "columns": meta["columns"]}


# ---------------------------------------------------------------- streaming


def stream(uri: str, columns: list[str], batch_size: int = 256) -> Iterator[dict]:
    """Rows of a materialised dataset, decoding only `columns` (Deep Lake memory grows with decoded columns)."""
    yield from _read_lake(uri, columns, batch_size)


def rl_prompts(uri: str, batch_size: int = 256, fmt: str = "qa") -> list[str]:
    """A prompts dataset as policy prompts (`Question: …\\n\\nAnswer:`, or `plain`: as they are), in dataset
    order."""
    from rlhf_lib.data.formatting import rl_prompt

    return [rl_prompt(row, fmt) for row in stream(uri, ["instruction", "input"], batch_size)]


def to_hf_dataset(uri: str, columns: list[str], batch_size: int = 256, transform=None):
    """Stream a Deep Lake dataset into an HF `datasets.Dataset` (Arrow on disk, so memory stays flat)."""
    import datasets

    def gen():
        for row in stream(uri, columns, batch_size):
            yield transform(row) if transform else row

    # The URI in gen_kwargs keys the Arrow cache, so a changed dataset never reuses a stale cache.
    return datasets.Dataset.from_generator(lambda uri: gen(), gen_kwargs={"uri": uri})
