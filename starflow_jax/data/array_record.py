"""ArrayRecord shards of precomputed records (latents, text embeddings, captions), the
large-scale training format, and a random-access grain source over them.

A directory holds ``shard-00000-of-0000N.array_record`` files plus ``index.json`` (record counts
per shard, the first record's field names / shapes / dtypes). Each record is the bytes of a
NumPy ``.npz`` (``np.savez``, read back with ``allow_pickle=False``: no pickle, self-describing);
strings are stored as NumPy unicode arrays, so they come back as 0-d ``<U`` arrays.

Field names are kept as written. The train step reads ``image`` (the flow's input: here the
latent) and ``cond`` (the conditioning embedding), so pass ``rename=TRAIN_STEP_KEYS``
(``latent -> image``, ``text_emb -> cond``) and ``fields=`` the numeric ones to train on them."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "starflow-npz-v1"
INDEX_FILE = "index.json"
SHARD_SUFFIX = ".array_record"
TRAIN_STEP_KEYS = {"latent": "image", "text_emb": "cond"}
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: what random access (grain) needs


def encode_record(record: Mapping[str, Any]) -> bytes:
    """A record (name -> array / str / number) as ``.npz`` bytes; object arrays are refused."""
    if not record:
        raise ValueError("a record must have at least one field")
    arrays = {}
    for name, value in record.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"field names must be non-empty strings without '/', got {name!r}")
        a = np.asarray(value)
        if a.dtype.hasobject:
            raise ValueError(f"field {name!r} has dtype object ({type(value).__name__}): store arrays, str or numbers")
        arrays[name] = a
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def decode_record(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of ``encode_record``: field name -> numpy array (strings as 0-d ``<U`` arrays)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}{SHARD_SUFFIX}"


def _field_spec(record: Mapping[str, np.ndarray]) -> dict:
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in record.items()}


def write_shards(
    out_dir: str | Path,
    records_iter: Iterable[Mapping[str, Any]],
    *,
    records_per_shard: int = 1024,
    overwrite: bool = False,
) -> list[Path]:
    """Writes the records into ``out_dir`` as ArrayRecord shards of ``records_per_shard`` records
    and an ``index.json``; returns the shard paths. A non-empty ``out_dir`` is refused unless
    ``overwrite``, which then replaces only earlier shards and the index (other files stay).
    Every record must have the same field names as the first."""
    from array_record.python import array_record_module

    if int(records_per_shard) < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace its shards and index")
        ours = [
            *out.glob(f"shard-*-of-*{SHARD_SUFFIX}"),
            *out.glob(f".shard-*{SHARD_SUFFIX}.partial"),
            out / INDEX_FILE,
            out / f".{INDEX_FILE}.partial",
        ]
        for p in ours:
            p.unlink(missing_ok=True)
    partial: list[Path] = []
    shards: list[Path] = []
    counts: list[int] = []
    fields, writer = None, None
    try:
        for n, record in enumerate(records_iter):
            data = encode_record(record)
            if fields is None:
                fields = _field_spec(decode_record(data))
            elif set(record) != set(fields):
                raise ValueError(f"record {n} has fields {sorted(record)}, the first record has {sorted(fields)}")
            if writer is None:
                partial.append(out / f".shard-{len(partial):05d}{SHARD_SUFFIX}.partial")
                writer = array_record_module.ArrayRecordWriter(str(partial[-1]), _WRITER_OPTIONS)
                counts.append(0)
            writer.write(data)
            counts[-1] += 1
            if counts[-1] == records_per_shard:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()
            writer = None
        if fields is None:
            raise ValueError("no records to write")
        shards = [out / shard_name(i, len(partial)) for i in range(len(partial))]
        for src, dst in zip(partial, shards):
            src.replace(dst)
    except BaseException:
        if writer is not None:
            writer.close()
        for p in [*partial, *shards]:  # only the files this call created
            p.unlink(missing_ok=True)
        raise
    index = {
        "format": FORMAT,
        "num_records": sum(counts),
        "shards": [{"file": s.name, "num_records": c} for s, c in zip(shards, counts)],
        "fields": fields,
    }
    tmp = out / f".{INDEX_FILE}.partial"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    tmp.replace(out / INDEX_FILE)
    return shards


def count_records(path: Path) -> int:
    """The records in one ArrayRecord shard (a ValueError naming the file when it is unreadable)."""
    from array_record.python import array_record_module

    try:  # the C++ reader raises RuntimeError / ValueError on a bad file (some only on close)
        reader = array_record_module.ArrayRecordReader(str(path))
        try:
            n = int(reader.num_records())
        finally:
            reader.close()
    except Exception as e:
        raise ValueError(f"cannot read ArrayRecord shard {path}: {e}") from e
    return n


class ArrayRecordSource:
    """Random access over all records of ArrayRecord shards: a directory (its ``*.array_record``
    files, sorted, checked against its ``index.json`` when there is one) or a list of shard
    paths, in order. Record ``i`` is the decoded dict, restricted to ``fields`` (stored names;
    all when None) and with keys renamed by ``rename`` (stored name -> returned name). A
    directory on object storage (``gs://...``) is read from a local copy (``remote_cache``)."""

    def __init__(
        self,
        path_or_dir: str | Path | Sequence[str | Path],
        *,
        fields: Sequence[str] | None = None,
        rename: Mapping[str, str] | None = None,
    ):
        import grain

        self.index: dict | None = None
        if isinstance(path_or_dir, str) and "://" in path_or_dir:
            from starflow_jax.data.remote_cache import local_copy

            path_or_dir = local_copy(path_or_dir)
        if isinstance(path_or_dir, (str, Path)):
            root = Path(path_or_dir)
            if not root.exists():
                raise ValueError(f"ArrayRecord path {root} does not exist")
            if root.is_dir():
                self.shards = sorted(root.glob(f"*{SHARD_SUFFIX}"))
                if not self.shards:
                    raise ValueError(f"{root} has no *{SHARD_SUFFIX} shards")
                if (root / INDEX_FILE).exists():
                    try:
                        self.index = json.loads((root / INDEX_FILE).read_text())
                    except ValueError as e:
                        raise ValueError(f"{root / INDEX_FILE} is not valid JSON: {e}") from e
            else:
                self.shards = [root]
        else:
            self.shards = [Path(p) for p in path_or_dir]
            if not self.shards:
                raise ValueError("no ArrayRecord shards given")
            missing = [str(p) for p in self.shards if not p.is_file()]
            if missing:
                raise ValueError(f"ArrayRecord shards do not exist: {missing}")
        self.shard_counts = [count_records(p) for p in self.shards]
        if self.index is not None:
            self._check_index()
        self.fields = None if fields is None else list(fields)
        if self.fields is not None and self.index is not None:
            unknown = sorted(set(self.fields) - set(self.index["fields"]))
            if unknown:
                raise ValueError(f"fields {unknown} are not in the records (they have {sorted(self.index['fields'])})")
        self.rename = dict(rename or {})
        if len(set(self.rename.values())) != len(self.rename):
            raise ValueError(f"rename maps several fields to one name: {self.rename}")
        self._source = grain.sources.ArrayRecordDataSource([str(p) for p in self.shards])

    def _check_index(self) -> None:
        idx, where = self.index, self.shards[0].parent / INDEX_FILE
        if not isinstance(idx, dict) or idx.get("format") != FORMAT:
            raise ValueError(
                f"{where}: not a {FORMAT} index (format={idx.get('format') if isinstance(idx, dict) else idx!r})"
            )
        try:
            listed = [(s["file"], int(s["num_records"])) for s in idx["shards"]]
            total = int(idx["num_records"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed index ({type(e).__name__}: {e})") from e
        found = [(p.name, c) for p, c in zip(self.shards, self.shard_counts)]
        if listed != found:
            raise ValueError(
                f"{where} disagrees with the shards: it lists (file, records) {listed}, the directory has {found}"
            )
        if total != sum(self.shard_counts):
            raise ValueError(f"{where} says {total} records, the shards hold {sum(self.shard_counts)}")

    def __len__(self) -> int:
        return sum(self.shard_counts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        record = decode_record(self._source[i])
        if self.fields is not None:
            missing = [k for k in self.fields if k not in record]
            if missing:
                raise KeyError(f"record {i} has no fields {missing} (it has {sorted(record)})")
            record = {k: record[k] for k in self.fields}
        return {self.rename.get(k, k): v for k, v in record.items()}

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.shards)} shards, {len(self)} records)"


def write_one_shard(
    out_dir: str | Path, i: int, n: int, records: Iterable[Mapping[str, Any]]
) -> tuple[Path, int, dict]:
    """Shard ``i`` of ``n`` written atomically (a partial file renamed when complete), for
    writers that resume shard by shard; returns ``(path, record count, field spec)``."""
    from array_record.python import array_record_module

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / shard_name(i, n)
    partial = out / f".{final.name}.partial"
    writer = array_record_module.ArrayRecordWriter(str(partial), _WRITER_OPTIONS)
    count, fields = 0, None
    try:
        for record in records:
            data = encode_record(record)
            if fields is None:
                fields = _field_spec(decode_record(data))
            writer.write(data)
            count += 1
        writer.close()
        writer = None
        if count == 0:
            raise ValueError(f"shard {i} of {n} has no records")
        partial.replace(final)
    except BaseException:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
        raise
    return final, count, fields


def write_index(out_dir: str | Path, shards: Sequence[Path], fields: dict) -> None:
    """``index.json`` for complete shards (counted from the files), written atomically."""
    out = Path(out_dir)
    counts = [count_records(Path(s)) for s in shards]
    index = {
        "format": FORMAT,
        "num_records": sum(counts),
        "shards": [{"file": Path(s).name, "num_records": c} for s, c in zip(shards, counts)],
        "fields": fields,
    }
    tmp = out / f".{INDEX_FILE}.partial"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    tmp.replace(out / INDEX_FILE)
