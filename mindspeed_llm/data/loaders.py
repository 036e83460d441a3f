"""Streaming readers for raw data files: records are yielded one at a time, never loaded whole.

`--input` may be a file, a directory (its files, not recursive), a glob, or a comma-separated list of
any of these. Formats by extension: .parquet .arrow .csv .json .jsonl .txt. A .json file may hold a JSON
array or JSON lines. Errors name the file and line.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Union

from mindspeed_llm.errors import UserError

try:
    import orjson  # optional: only speeds up decoding JSON lines
except ImportError:
    orjson = None

FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json",
           ".txt": "text"}
_CHUNK = 1 << 20


def resolve_inputs(spec: str) -> list[Path]:
    """Expand `--input` into the data files, in a stable order."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path = Path(os.path.expanduser(part))
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
            if not found:
                raise UserError(f"--input {part}: the directory holds no {'/'.join(FORMATS)} file")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in part for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(part) if Path(p).is_file())
            if not found:
                raise UserError(f"--input {part}: the pattern matches no file")
            files += found
        else:
            raise UserError(f"--input {part}: no such file or directory")
    if not files:
        raise UserError("--input names no file")
    for f in files:
        if f.suffix.lower() not in FORMATS:
            raise UserError(f"--input {f}: unsupported extension {f.suffix!r}; expected one of {', '.join(FORMATS)}")
    return files


@dataclass
class Progress:
    """How far through the input we are, for ETA: by bytes for text formats, by rows for columnar ones."""
    done: float = 0.0
    total: float = 0.0

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0


def iter_records(files: list[Path], progress: Progress | None = None) -> Iterator[dict]:
    """Yield dict records from every file in order."""
    progress = progress if progress is not None else Progress()
    progress.total = float(sum(f.stat().st_size for f in files))
    for path in files:
        fmt = FORMATS[path.suffix.lower()]
        reader = {"json": _iter_json, "text": _iter_text, "csv": _iter_csv, "parquet": _iter_parquet,
                  "arrow": _iter_arrow}[fmt]
        start = progress.done
        size = path.stat().st_size
        for record, fraction in reader(path):
            progress.done = start + fraction * size
            yield record
        progress.done = start + size


def first_record(files: list[Path]) -> dict:
    for record in iter_records(files[:1]):
        return record
    raise UserError(f"--input {files[0]}: the file holds no record")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, lineno, exc.start + 1, raw[exc.start]) from None


def _utf8_error(path: Path, lineno: int, column: int | None, byte: int) -> UserError:
    where = f" at byte column {column}" if column else ""
    return UserError(f"{path}:{lineno}: invalid UTF-8 (byte 0x{byte:02x}{where}); the input must be UTF-8 text: "
                     f"re-encode the file (e.g. iconv -f <encoding> -t UTF-8)")


def _iter_text(path: Path) -> Iterator[tuple[dict, float]]:
    size = max(path.stat().st_size, 1)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno).rstrip("\r\n")
            if line:
                yield {"text": line}, f.tell() / size


def _iter_json(path: Path) -> Iterator[tuple[dict, float]]:
    """JSON lines, or one JSON array decoded element by element without reading the whole file."""
    size = max(path.stat().st_size, 1)
    with path.open("rb") as f:
        if _holds_json_array(f):
            yield from _iter_json_array(_Utf8Reader(f, path), path, size)
            return
        offset = 0
        for lineno, raw in enumerate(f, 1):
            offset += len(raw)
            record = _json_line(raw, path, lineno)
            if record is not None:
                yield record, offset / size


def _json_line(raw: bytes, path: Path, lineno: int) -> dict | None:
    """One line of a JSON-lines file as a record; None for a blank line."""
    # orjson decodes a few times faster and agrees with `json` on what both accept, except that it turns
    # integers beyond 64 bits into floats: records with a float (checked after decoding, cheaper than searching
    # the line for long digit runs), and whatever orjson refuses (blank lines, NaN, lone surrogates, errors),
    # go to `json`, which decides and words the errors.
    if orjson is not None:
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(record, dict) and not _holds_float(record):
                return record
    line = _decode(raw, path, lineno)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
    return record


def _holds_float(value) -> bool:
    if type(value) is float:
        return True
    if type(value) is dict:
        return any(map(_holds_float, value.values()))
    if type(value) is list:
        return any(map(_holds_float, value))
    return False


def _holds_json_array(f) -> bool:
    """Whether the binary file `f` (a .json/.jsonl file) holds one JSON array rather than JSON lines; `f` is left
    at its start."""
    first = f.read(4096).lstrip()[:1]
    f.seek(0)
    return first == b"["


def _is_json_lines(path: Path) -> bool:
    if FORMATS[path.suffix.lower()] != "json":
        return False
    with path.open("rb") as f:
        return not _holds_json_array(f)


@dataclass
class JsonLinesChunk:
    """Consecutive lines of a JSON-lines file, not yet decoded: a worker process decodes them, so the reading
    process only splits lines, and raw bytes are cheaper to send between processes than decoded records."""
    path: Path
    first_line: int  # 1-based number of lines[0]
    lines: list[bytes]

    def records(self) -> list[dict]:
        out = []
        for lineno, raw in enumerate(self.lines, self.first_line):
            record = _json_line(raw, self.path, lineno)
            if record is not None:
                out.append(record)
        return out


RecordChunk = Union[JsonLinesChunk, list]


def chunk_records(chunk: RecordChunk) -> list[dict]:
    """The records of a chunk from `iter_record_chunks`."""
    return chunk.records() if isinstance(chunk, JsonLinesChunk) else chunk


def iter_record_chunks(files: list[Path], size: int, progress: Progress | None = None) -> Iterator[RecordChunk]:
    """The records of every file in order, in chunks of `size` (records, or lines of a JSON-lines file, blank
    ones included); read through `chunk_records`. Unlike `iter_records`, a JSON-lines file is only split
    into lines here: malformed lines are reported when their chunk is decoded."""
    progress = progress if progress is not None else Progress()
    progress.total = float(sum(f.stat().st_size for f in files))
    for path in files:
        if not _is_json_lines(path):
            start, in_file = progress.done, Progress()
            records = iter_records([path], in_file)
            while chunk := list(islice(records, size)):
                progress.done = start + in_file.done
                yield chunk
            continue
        with path.open("rb") as f:
            first_line = 1
            while lines := list(islice(f, size)):
                progress.done += sum(map(len, lines))
                yield JsonLinesChunk(path, first_line, lines)
                first_line += len(lines)


class _Utf8Reader:
    """`read(n)` of decoded text from a binary file; invalid UTF-8 is an error naming the line."""

    def __init__(self, f, path: Path) -> None:
        import codecs

        self.f, self.path = f, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.lines = 1          # newlines in the bytes decoded so far, plus one

    def read(self, n: int) -> str:
        raw = self.f.read(n)
        try:
            text = self.decoder.decode(raw, final=not raw)
        except UnicodeDecodeError as exc:
            data = exc.object        # this read's bytes (after any held back from the last): no newline skipped
            line = self.lines + data.count(b"\n", 0, exc.start)
            raise _utf8_error(self.path, line, None, data[exc.start]) from None
        self.lines += text.count("\n")
        return text


def _iter_json_array(f, path: Path, size: int) -> Iterator[tuple[dict, float]]:
    decoder = json.JSONDecoder()
    buf = f.read(_CHUNK)
    pos = buf.index("[") + 1
    consumed, line = 0, 1  # characters dropped from buf so far, newlines before buf[pos]

    def fill() -> bool:
        nonlocal buf, pos, consumed, line
        more = f.read(_CHUNK)
        line += buf.count("\n", 0, pos)
        consumed += pos
        buf, pos = buf[pos:] + more, 0
        return bool(more)

    while True:
        while True:  # skip whitespace and one comma
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or not fill():
                break
        if pos >= len(buf):
            raise UserError(f"{path}: malformed JSON (the array is not closed)")
        if buf[pos] == "]":
            return
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as exc:
                at = line + buf.count("\n", 0, exc.pos)
                if not fill():
                    raise UserError(f"{path}:{at}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            at = line + buf.count("\n", 0, pos)
            raise UserError(f"{path}:{at}: expected an array of JSON objects, got {type(record).__name__}")
        pos = end
        yield record, min((consumed + pos) / size, 1.0)
        if pos > _CHUNK:
            fill()


def _iter_csv(path: Path) -> Iterator[tuple[dict, float]]:
    import pyarrow.csv as pcsv

    size = max(path.stat().st_size, 1)
    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=_CHUNK))
    except Exception as exc:  # pyarrow raises ArrowInvalid with the reason
        raise UserError(f"{path}: cannot read CSV ({exc})") from None
    done = 0
    for batch in reader:
        rows = batch.to_pylist()
        done += batch.nbytes
        for i, row in enumerate(rows):
            yield row, min(done / size, 1.0)


def _iter_table_batches(batches, num_rows: int) -> Iterator[tuple[dict, float]]:
    done = 0
    for batch in batches:
        for row in batch.to_pylist():
            done += 1
            yield row, done / max(num_rows, 1)


def _iter_parquet(path: Path) -> Iterator[tuple[dict, float]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read parquet ({exc})") from None
    yield from _iter_table_batches(pf.iter_batches(batch_size=1024), pf.metadata.num_rows)


def _iter_arrow(path: Path) -> Iterator[tuple[dict, float]]:
    """Arrow IPC: the stream format (what `datasets` writes) or the file format."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            batches = list(reader)  # record batches are memory-mapped views, not copies
        except pa.ArrowInvalid:
            source = pa.memory_map(str(path))
            reader = pa.ipc.open_file(source)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except Exception as exc:
        raise UserError(f"{path}: cannot read Arrow IPC data ({exc})") from None
    yield from _iter_table_batches(batches, sum(b.num_rows for b in batches))
