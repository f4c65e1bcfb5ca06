"""Read a site's table through the `datasets` library (Arrow, memory-mapped, cached).

Formats: JSON Lines, JSON, CSV, Parquet, a `save_to_disk` directory, or any `datasets`
builder that works offline. No hand-rolled readers: the only file scanning here happens
after `datasets` has failed, to say which line of a JSON Lines file is broken.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from fedslm.data.errors import DataError

# the formats read from a file by extension or data.format (anything else is a builder name)
FILE_FORMATS = ("jsonl", "json", "csv", "parquet", "arrow")

_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
              ".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow"}


def guess_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return "arrow"
        raise DataError(
            f"{path} is a directory but not one written by datasets.save_to_disk "
            "(no dataset_info.json / state.json); point data.path at a file, or set data.format=<builder>"
        )
    fmt = _BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format of {path.name} from its extension {path.suffix!r}; "
            f"set data.format to one of: {', '.join(sorted(set(_BY_SUFFIX.values())))}"
        )
    return fmt


def load_table(path: str | None, fmt: str | None = None, cache_dir: str | None = None) -> datasets.Dataset:
    """One `datasets.Dataset` from a file, a save_to_disk directory or an offline builder.
    With `cache_dir`, its Arrow copy (and every map over it) lives there, owner-only."""
    if cache_dir:
        private_dir(Path(cache_dir))
    if fmt and fmt not in FILE_FORMATS:
        return _from_builder(fmt, path)
    if not path:
        raise DataError("data.path is not set; give a file or directory (or set data.format=<builder>)")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data file {p} does not exist; check data.path (or the site's --node-config data-path)")
    fmt = fmt or guess_format(p)
    try:
        if fmt == "arrow":
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{p} holds splits {list(ds)}; save the training split as 'train'")
                ds = ds["train"]
        elif fmt in ("jsonl", "json"):
            ds = datasets.Dataset.from_json(str(p), cache_dir=cache_dir)
        elif fmt == "csv":
            ds = datasets.Dataset.from_csv(str(p), sep="\t" if p.suffix.lower() == ".tsv" else ",", cache_dir=cache_dir)
        else:
            ds = datasets.Dataset.from_parquet(str(p), cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as err:  # datasets/pyarrow raise many types; the user needs one message
        raise DataError(_explain_read_error(p, fmt, err)) from err
    if len(ds) == 0:
        raise DataError(f"{p} has no rows; a site needs at least one training example")
    return ds


def _from_builder(builder: str, path: str | None) -> datasets.Dataset:
    try:
        kwargs = {"data_files": path} if path else {}
        ds = datasets.load_dataset(builder, split="train", **kwargs)
    except Exception as err:
        raise DataError(
            f"datasets builder {builder!r} could not be loaded offline ({type(err).__name__}: {err}); "
            "use local files (data.path) or a builder already in the datasets cache"
        ) from err
    if len(ds) == 0:
        raise DataError(f"datasets builder {builder!r} gave no rows")
    return ds


def _explain_read_error(path: Path, fmt: str, err: Exception) -> str:
    if "corresponds to no data" in str(err) or path.stat().st_size == 0:
        return f"{path} has no rows; a site needs at least one training example"
    if fmt == "jsonl" or (fmt == "json" and path.read_bytes()[:64].lstrip().startswith(b"{")):
        bad = first_bad_json_line(path)
        if bad is not None:
            line, msg = bad
            return (f"{path}: line {line} is not valid JSON ({msg}); fix or remove that line "
                    "(each line must hold one JSON object)")
    try:
        path.open("rb").read(1)
    except OSError as os_err:
        return f"cannot read {path}: {os_err.strerror}; check the file's permissions"
    return (f"cannot read {path} as {fmt} ({type(err).__name__}: {str(err)[:200]}); "
            "check the file, or set data.format if the extension is misleading")


def first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line number, reason) of the first line that is not a JSON object.

    Lines are split on b"\\n" only: U+2028/U+2029 inside strings are valid JSON and must
    not be treated as line breaks (str.splitlines would)."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                return number, str(err)
            if not isinstance(obj, dict):
                return number, f"expected an object, got {type(obj).__name__}"
    return None


def private_dir(path: Path) -> Path:
    """A directory only its owner can enter (created so, and tightened if it exists)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path
