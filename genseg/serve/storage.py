"""Model artifacts from AIP_STORAGE_URI: a local folder as it is, a gs:// folder downloaded first.

Object names are chosen by whoever can write to the bucket, so each one is checked before it becomes a local
path: it must land inside the download folder, and only objects below the URI's folder (bounded at "/") count.
"""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, GensegError


def safe_relative_path(name: str, root: Path) -> Path:
    """`root / name` for an archive or bucket member `name`, refusing any name that would leave `root`
    (absolute paths, `..` parts, backslash or drive tricks, empty parts)."""
    parts = PurePosixPath(name).parts
    if (not parts or name.startswith("/") or "\\" in name or ":" in parts[0]
            or any(part in ("", ".", "..") for part in parts)):
        raise CheckpointError(f"refusing the model: member {name!r} would be written outside its folder")
    target = (root / Path(*parts)).resolve()
    if not target.is_relative_to(root.resolve()):
        raise CheckpointError(f"refusing the model: member {name!r} would be written outside its folder")
    return target


def resolve_model_uri(uri: str) -> Path:
    """A local path as it is; a gs:// URI downloaded to a new temporary folder (needs google-cloud-storage)."""
    if not uri.startswith("gs://"):
        return Path(uri)
    try:
        from google.cloud import storage
    except ImportError:
        raise GensegError(f"{uri}: reading gs:// needs google-cloud-storage: pip install 'genseg[gcs]'") from None

    bucket_name, _, prefix = uri[len("gs://"):].partition("/")
    prefix = prefix.strip("/")
    prefix = f"{prefix}/" if prefix else ""  # gs://b/seg-demo must not pull in gs://b/seg-demo-old/...
    target = Path(tempfile.mkdtemp(prefix="genseg-model-"))
    blobs = [blob for blob in storage.Client().list_blobs(bucket_name, prefix=prefix)
             if blob.name.startswith(prefix) and not blob.name.endswith("/")]
    paths = [safe_relative_path(blob.name[len(prefix):], target) for blob in blobs]  # all checked first
    if not blobs:
        raise CheckpointError(f"{uri}: no objects under this folder")
    for blob, path in zip(blobs, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(path))
    return target
