"""Reading datasets: local files and hub ids. The only module that touches data on disk or the hub.

Local tables are read with pandas (CSV/TSV/TXT as text, so labels and ids keep their exact spelling), JSON/JSONL
as records, Parquet with pyarrow; every failure becomes one clear FtctlError naming the file.
"""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import datasets
import pandas as pd
import pyarrow as pa

from ftctl.errors import FtctlError

if TYPE_CHECKING:
    import datasets

TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".parquet")
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}


def check_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        try:
            p.stat()
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FtctlError(
                    f"{what} {path} is a symbolic link loop (it points back to itself); fix the link"
                ) from None
        raise FtctlError(f"{what} not found: {path}")
    if not p.is_file():
        raise FtctlError(f"{what} is not a file: {path}")
    if p.stat().st_size == 0:
        raise FtctlError(f"{what} is empty: {path}")
    return p


def read_text(p: Path, what: str) -> str:
    """A text file's content; one clear line when it is not UTF-8, naming where and how to convert it."""
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FtctlError(
            f"{what} {p} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}); convert it, "
            f"e.g. iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}"
        ) from None


def check_table(p: Path, delimiter: str, what: str) -> None:
    """Refuse a table with two columns of the same name (pandas would silently rename the second one), and a row
    with more or fewer fields than the header: pandas would take a first row with one field more for an index
    column and shift every row after it by one column (texts read as labels), or drop the extra fields with
    index_col=False."""
    with p.open(encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader([f.readline()], delimiter=delimiter), [])
        names = [h.strip() for h in header]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise FtctlError(
                f"{what} {p} has the column header {', '.join(map(repr, twice))} twice; give each column its own name"
            )
        if delimiter == ONE_COLUMN:
            return
        f.seek(0)
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting_of(delimiter))
        width = len(next(reader, []))
        for row in reader:
            if row and len(row) != width:
                name = {"\t": "tab", ",": "comma"}.get(delimiter, repr(delimiter))
                hint = (
                    "texts holding a tab cannot be read from a TSV; use CSV or JSONL"
                    if delimiter == "\t"
                    else f'quote texts that hold a {name} ("a, b")'
                )
                raise FtctlError(
                    f"{what} {p}: line {reader.line_num} has {len(row)} {name}-separated fields, the header "
                    f"{width}; {hint}"
                )


def quoting_of(delimiter: str) -> Literal[0, 3]:
    """GLUE-style TSVs (and one-column files) are unquoted: quotes inside sentences are text, not field delimiters."""
    return csv.QUOTE_NONE if delimiter in ("\t", ONE_COLUMN) else csv.QUOTE_MINIMAL


ONE_COLUMN = "\x1f"  # the ASCII unit separator, never in text: each line of a one-column file is one field


def _sniff_delimiter(p: Path, first: str | None = None) -> str:
    """The separator named by the header line, `first` where the header holds it (a comma for .csv: a header
    `text;label` of a .csv is semicolon-separated, as spreadsheets write it in many locales); a header with none
    is a one-column table (a file of texts)."""
    with p.open(encoding="utf-8", errors="replace") as f:
        header = f.readline()
    for delimiter in (first, "\t", ";", "|", ","):
        if delimiter and delimiter in header:
            return delimiter
    return ONE_COLUMN


def read_records(path: str, what: str = "data file") -> list[dict[str, Any]]:
    """Rows of a JSON array (or `{"data": [...]}`) or a JSON Lines file."""
    p = check_file(path, what)
    text = read_text(p, what)
    if p.suffix == ".jsonl" or (not text.lstrip().startswith("[") and "\n{" in text.strip()):
        rows = _json_lines(text, path, what)
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FtctlError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if isinstance(rows, dict) and isinstance(rows.get("data"), list):
        rows = rows["data"]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise FtctlError(f"{what} {path} must hold a list of JSON objects (one per example)")
    if not rows:
        raise FtctlError(f"{what} has no examples: {path}")
    return rows


def _json_lines(text: str, path: str, what: str) -> list[Any]:
    """One JSON value per non-blank line; a broken one is named by its line in the file."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise FtctlError(f"{what} {path} is not valid JSON (line {number}: {exc.msg})") from None
    return rows


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    kinds: dict[type, str] = {str: "a text", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def check_kinds(rows: list[dict[str, Any]], path: str, what: str) -> None:
    """Refuse a column whose rows hold different kinds of value (a number where the others hold texts, a list
    where they hold numbers): Arrow, under datasets, cannot store it and would raise its own error."""
    first: dict[str, tuple[str, int]] = {}
    for number, row in enumerate(rows, start=1):
        for key, value in row.items():
            kind = _kind(value)
            if kind is None:
                continue
            seen = first.setdefault(key, (kind, number))
            if seen[0] != kind:
                raise FtctlError(
                    f"{what} {path}: '{key}' holds {kind} in row {number} but {seen[0]} in row {seen[1]}; give every "
                    f'row the same kind of value (quote numbers meant as text: "42")'
                )


def dataset_of(rows: list[dict[str, Any]], path: str, what: str) -> datasets.Dataset:
    check_kinds(rows, path, what)
    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # a nested field (a turn's content) of mixed kinds
        raise FtctlError(
            f"{what} {path}: a nested field holds different kinds of value in different rows ({exc}); give every "
            "row the same kind of value"
        ) from None


def read_table(path: str, what: str = "data file") -> datasets.Dataset:
    """A local CSV/TSV/TXT/JSON/JSONL/Parquet file as a Dataset (text tables keep every cell as a string)."""
    p = check_file(path, what)
    suffix = p.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise FtctlError(f"{what} {path} has an unsupported type '{suffix}'; use one of {', '.join(TABLE_SUFFIXES)}")
    if suffix in (".json", ".jsonl"):
        return dataset_of(read_records(path, what), path, what)
    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(p)
        else:
            delimiter = "\t" if suffix == ".tsv" else _sniff_delimiter(p, "," if suffix == ".csv" else None)
            if suffix == ".csv" and delimiter == ONE_COLUMN:
                delimiter = ","  # one quoted column: a CSV writer quotes the texts that hold commas
            read_text(p, what)  # a clear line for a file that is not UTF-8
            check_table(p, delimiter, what)
            frame = pd.read_csv(
                p,
                sep=delimiter,
                dtype=str,
                keep_default_na=False,
                quoting=quoting_of(delimiter),
                encoding="utf-8",
                on_bad_lines="error",
                index_col=False,  # never a first column taken for the index (check_table refused ragged rows)
            )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FtctlError(f"cannot parse {what} {path}: {first}") from None
    if frame.empty:
        raise FtctlError(f"{what} has a header but no rows: {path}")
    frame.columns = [str(c).strip() for c in frame.columns]
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def load_hub(dataset_id: str, config: str | None) -> dict[str, datasets.Dataset]:
    """A hub dataset's splits, under our split names (train, validation, test)."""
    try:
        loaded = datasets.load_dataset(dataset_id, config)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FtctlError(
            f"could not load dataset '{dataset_id}'{f' ({config})' if config else ''} from the Hugging Face hub: "
            f"{reason}; for local data pass --train-file (and --validation-file/--test-file)"
        ) from None
    return {SPLIT_ALIASES[name]: split for name, split in loaded.items() if name in SPLIT_ALIASES}


def to_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    return str(value)


def read_json_objects(path: str, what: str = "data file") -> list[dict[str, Any]]:
    """Rows of a JSON array, `{"data": [...]}`, JSON Lines, or JSON objects written one after another (pretty-printed
    or not), as some dataset samples are."""
    p = check_file(path, what)
    text = read_text(p, what)
    try:
        return read_records(path, what)
    except FtctlError:
        if not text.lstrip().startswith("{"):
            raise
    decoder = json.JSONDecoder()
    rows, at = [], 0
    while at < len(text):
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            break
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise FtctlError(f"{what} {path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        rows.append(value)
    if len(rows) == 1 and isinstance(rows[0], dict) and isinstance(rows[0].get("data"), list):
        rows = rows[0]["data"]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise FtctlError(f"{what} {path} must hold JSON objects (one per example)")
    return rows
