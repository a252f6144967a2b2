"""Locations: a local path or any URI pyarrow/fsspec opens (`s3://`, `gs://`, `abfs://`, `file://`).

`resolve(location)` gives the (pyarrow FileSystem, path) pair every reader and writer goes through.
S3 settings come only from the standard AWS variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, `AWS_DEFAULT_REGION`), read in `s3_options` alone.

Object stores have no rename, so a folder is published "atomically in spirit" (`publish_tree`): the
old marker (e.g. `manifest.json`) is removed first, every other file is uploaded (an object exists
only once its upload completed), and the marker goes last. A location without its marker is
incomplete; rerunning the publish skips the objects already there and completes it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

__all__ = [
    "AWS_VARIABLES",
    "aws_env",
    "download_tree",
    "exists",
    "is_file",
    "is_remote",
    "join",
    "list_files",
    "local_staging",
    "mlflow_s3_env",
    "open_input_file",
    "publish_tree",
    "read_bytes",
    "read_text",
    "remove",
    "resolve",
    "restore_uri",
    "s3_options",
    "write_bytes",
]

AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than `file` (a Windows drive letter is not a scheme)."""
    text = os.fspath(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme != "file"


def restore_uri(text: str) -> str:
    """`text` with the `//` after a URI scheme put back where `str(Path(uri))` collapsed it to `/`
    (`s3:/bucket/key` -> `s3://bucket/key`); anything else unchanged."""
    scheme, sep, rest = text.partition(":/")
    is_scheme = len(scheme) > 1 and scheme.isascii() and scheme.replace("+", "").isalnum()
    if sep and is_scheme and scheme != "file" and not rest.startswith("/"):
        return f"{scheme}://{rest}"
    return text


def endpoint_url() -> str | None:
    """The S3 endpoint from the AWS variables (the S3-specific one wins), or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_options() -> dict[str, Any]:
    """pyarrow `S3FileSystem` options from the AWS variables (pyarrow ignores AWS_ENDPOINT_URL itself).

    Keys are left to the AWS credential chain on each process, so a pickled filesystem (Ray ships it
    to its workers) carries no secret.
    """
    options: dict[str, Any] = {}
    endpoint = endpoint_url()
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        options["endpoint_override"] = rest if rest else endpoint
        options["scheme"] = scheme if rest else "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["region"] = region
    elif endpoint:
        options["region"] = "us-east-1"  # a local S3 server: skip pyarrow's bucket-region lookup
    return options


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI; local paths come back absolute."""
    text = os.fspath(location)
    if not is_remote(text):
        if text.startswith("file://"):
            text = text[len("file://") :]
        return pafs.LocalFileSystem(), str(Path(text).resolve())
    scheme, _, rest = text.partition("://")
    if scheme in ("s3", "s3a"):
        return _s3_filesystem(tuple(sorted(s3_options().items())), _aws_keys()), rest.rstrip("/")
    try:
        return pafs.FileSystem.from_uri(text)
    except _from_uri_errors() as err:  # a scheme pyarrow lacks: fsspec's, through pyarrow's handler
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as fs_err:
            raise ValueError(f"{text}: no filesystem for this location ({err}; {fs_err})") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")


def _aws_keys() -> tuple[str | None, ...]:
    """The credential variables a new S3 filesystem would read: part of its cache key."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    return tuple(os.environ.get(name) for name in names)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(options: tuple[tuple[str, Any], ...], keys: tuple[str | None, ...]) -> pafs.S3FileSystem:
    """One S3 filesystem per endpoint and credentials for the process: making one costs ~20 ms of CPU
    (the AWS SDK client), more than a small read; the loader opens a row group's file many times."""
    return pafs.S3FileSystem(**dict(options))


def _from_uri_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError)


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location/part/...` for a URI or a path (URIs always join with `/`)."""
    text = os.fspath(location)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(text, *parts))


def _info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return _info(location).type == pafs.FileType.File


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole object; FileNotFoundError when it is not there."""
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write one object: a single PUT on an object store (whole or absent), temp + rename locally."""
    if not is_remote(location):
        from facepipe.fsutil import write_bytes_atomic

        write_bytes_atomic(resolve(location)[1], data)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as out:
        out.write(data)


def remove(location: str | os.PathLike) -> None:
    """Delete a file if it is there."""
    fs, path = resolve(location)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def open_input_file(location: str | os.PathLike) -> Any:
    """A seekable file whose reads are range requests on an object store (Parquet reads only what it
    needs: the footer, then the row groups asked for)."""
    fs, path = resolve(location)
    return fs.open_input_file(path)


def list_files(location: str | os.PathLike, suffix: str = "") -> list[str]:
    """Files directly in `location` whose names end with `suffix`, hidden ones excluded; sorted, as
    locations of the same kind (URIs under a URI, paths under a path)."""
    fs, path = resolve(location)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
    names = sorted(
        info.base_name
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
        and info.base_name.endswith(suffix)
        and not info.base_name.startswith(".")
    )
    return [join(location, name) for name in names]


def _tree(fs: pafs.FileSystem, root: str) -> dict[str, pafs.FileInfo]:
    selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
    return {
        info.path[len(root) :].lstrip("/"): info
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    }


PUBLISH_LEDGER = ".published"  # <location>/.published/<rel>.sha256: what each uploaded object holds


def publish_tree(local_dir: str | os.PathLike, location: str | os.PathLike, marker: str) -> dict[str, int]:
    """Copy `local_dir`'s files to `location`, `marker` (relative name) last; see the module docstring.

    Each upload is followed by a ledger entry with the file's sha256; a rerun (after a kill
    mid-upload) skips an object whose entry matches the local file's digest and size, so an object
    left by an earlier, different publish is never taken for this one. Hidden temp files (`.*.tmp`)
    are not published. Returns {"uploaded": n, "skipped": n}.
    """
    from facepipe.fsutil import sha256_file

    local = Path(local_dir)
    if not (local / marker).is_file():
        raise FileNotFoundError(f"{local / marker}: nothing to publish without its marker")
    fs, root = resolve(location)
    remove(join(location, marker))  # from here on the location reads as incomplete
    remote = _tree(fs, root)
    counts = {"uploaded": 0, "skipped": 0}
    files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    for file in files:
        rel = file.relative_to(local).as_posix()
        if rel == marker:
            continue
        digest = sha256_file(file)
        found, entry = remote.get(rel), f"{root}/{PUBLISH_LEDGER}/{rel}.sha256"
        if found is not None and found.size == file.stat().st_size and _ledger(fs, entry) == digest:
            counts["skipped"] += 1
            continue
        _upload(file, fs, f"{root}/{rel}", (entry, digest))
        counts["uploaded"] += 1
    _upload(local / marker, fs, f"{root}/{marker}", None)
    counts["uploaded"] += 1
    return counts


def _ledger(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        return None


def _upload(file: Path, fs: pafs.FileSystem, path: str, record: tuple[str, str] | None) -> None:
    """One object (a single PUT or multipart upload: whole or absent), then its ledger entry
    `record` = (entry path, sha256)."""
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    with open(file, "rb") as src, fs.open_output_stream(path) as out:
        shutil.copyfileobj(src, out, 8 << 20)
    if record is not None:
        with fs.open_output_stream(record[0]) as out:
            out.write(record[1].encode())


def download_tree(location: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy every file under `location` into `local_dir` (created); returns `local_dir`."""
    fs, root = resolve(location)
    out = Path(local_dir)
    for rel in sorted(_tree(fs, root)):
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(f"{root}/{rel}") as src, open(dst, "wb") as handle:
            shutil.copyfileobj(src, handle, 8 << 20)
    return out


@contextlib.contextmanager
def local_staging(location: str | os.PathLike) -> Iterator[Path]:
    """A local folder to build `location`'s files in before `publish_tree`: the same folder for the same
    location, so a rerun after a kill resumes what was staged; removed after a clean exit."""
    key = hashlib.sha1(os.fspath(location).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "facepipe-staging" / key
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def aws_env() -> dict[str, str]:
    """The standard AWS variables set here: what Ray jobs forward to their nodes."""
    return {k: os.environ[k] for k in AWS_VARIABLES if os.environ.get(k)}


def mlflow_s3_env() -> None:
    """MLflow's S3 artefact store uses boto3 with its own endpoint variable: take it from the AWS one
    when it is not set (the one place that maps them)."""
    endpoint = endpoint_url()
    if endpoint and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint
