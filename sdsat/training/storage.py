"""Where a run keeps its files: a local (or shared) directory, or a URI (s3://, gs://, file://...).

A URI stays a string end to end: Ray Train writes checkpoints there itself, and an export
to a URI is written locally and then copied up with pyarrow's filesystems.
"""

from __future__ import annotations

from pathlib import Path


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(base: str, *parts: str) -> str:
    """``base/part/...``: a URI stays a URI (a Path would fold its ``//``), a local path is expanded."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base).expanduser().joinpath(*parts))


def upload(local_dir: Path, uri: str) -> None:
    """Copy a local directory's files to a URI (pyarrow infers the filesystem from the scheme)."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    filesystem.create_dir(path, recursive=True)  # a local or mounted filesystem needs it; buckets ignore it
    pyarrow.fs.copy_files(str(local_dir), path, destination_filesystem=filesystem)
