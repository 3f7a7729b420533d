"""Where stage outputs live — a local directory (the default) or an S3 prefix — and moving files between the two:
the one place that tells a local path from a URI (with `rlhf_lib/workspace.py`, which says where a task's files
go). Local writes that readers depend on are atomic (`atomic_dir`, `atomic_write_json`).

A storage root is a string: an absolute local path, or `s3://bucket/prefix`. On a cluster every step runs in its
own pod, so nothing a step leaves on its local disk survives it: with an S3 root a stage works in a local scratch
directory (`scratch_root()`), downloads what it reads, and uploads what it writes (rlhf_lib/workspace.py). Readers
trust a directory only through a marker written after everything else (a stage's `result.json`, a checkpoint's
`COMPLETE`, a download's rename), so a torn upload or download is never used.

Everything goes through Metaflow's S3 machinery, with the endpoint Metaflow uses (`METAFLOW_S3_ENDPOINT_URL`, from
the environment or the Metaflow config; a MinIO or test server then serves both Metaflow's datastore and these
files), its credentials provider and its retry settings (transient errors — throttling, 5xx, dropped connections —
are retried): directories of `BULK_BYTES` or more (models, datasets) through Metaflow's own S3 client
(`metaflow.S3`: parallel workers, multipart, its own transient-error retries); listings, markers and small
directories (a LoRA checkpoint, a snapshot) through a boto3 client from Metaflow's AWS client provider, whose
start-up costs nothing (metaflow.S3 starts worker processes, about a second per call). Credentials come from the
usual chain (env, ~/.aws, instance or pod roles) and are never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

S3 = "s3://"
_SUPPORTED = (S3,)
BULK_BYTES = 32 * 1024 * 1024  # a directory this large goes through metaflow.S3's parallel workers


class StorageError(RuntimeError):
    """Storage that cannot be used; the message names the location and the fix."""


class Gone(StorageError):
    """What a reader looked for is not there (any more): nothing stored at a location, or a file removed while it
    was being read. For a checkpoint this means incomplete — never a fault of the storage itself."""


def scheme(uri: str) -> str:
    """`s3://` for S3 URIs, `gs://`-style prefixes as they are, '' for local paths."""
    head, sep, _ = str(uri).partition("://")
    return f"{head}://" if sep and "/" not in head else ""


def is_remote(uri: str | Path | None) -> bool:
    return bool(uri) and scheme(str(uri)) != ""


def names_a_place(text: str) -> bool:
    """Whether a string is an absolute local path or a storage URI (what artifacts hold for outputs)."""
    return text.startswith("/") or is_remote(text)


def place(location: str | Path) -> str:
    """A location as a place to compare with another: a local path resolved (a storage root reached through a
    symlink names one directory two ways), a URI without its trailing slash."""
    location = str(location).rstrip("/")
    return location if is_remote(location) else os.path.realpath(location)


def error_line(err: BaseException) -> str:
    """`Type: message` of an error on one line (metaflow.S3's messages span several): how a fault is named."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def join(root: str | Path, *parts: str) -> str:
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root).joinpath(*parts))


def absolute(root: str | Path, base: Path) -> str:
    """A storage root as a URI: an s3:// URI as given (without a trailing slash), else an absolute local path
    (`base`/root when it is relative)."""
    if is_remote(root):
        return str(root).rstrip("/")
    path = Path(root).expanduser()
    return str(path if path.is_absolute() else base / path)


def local_root(root: str) -> Path:
    """Where this machine keeps files for a storage root: the root itself when it is local, else the scratch dir."""
    return scratch_root() if is_remote(root) else Path(root)


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    if scheme(uri) != S3:
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3):].partition("/")
    return bucket, key.strip("/")


def endpoint_url() -> str | None:
    """Metaflow's S3 endpoint (env or Metaflow config), so this and Metaflow's datastore talk to one server; None
    means AWS itself. A Metaflow configuration that cannot be read is an error, not a silent switch to AWS."""
    url = os.environ.get("METAFLOW_S3_ENDPOINT_URL")
    if url:
        return url
    try:
        from metaflow.metaflow_config import S3_ENDPOINT_URL
    except Exception as err:
        raise StorageError(f"cannot read Metaflow's configuration to find the S3 endpoint ({type(err).__name__}: "
                           f"{err}); fix the Metaflow config (METAFLOW_HOME / ~/.metaflowconfig) or set "
                           f"METAFLOW_S3_ENDPOINT_URL") from err
    return S3_ENDPOINT_URL or None


def client_params() -> dict:
    """Metaflow's S3 client parameters (its DATATOOLS_CLIENT_PARAMS), with the endpoint `endpoint_url()` says."""
    from metaflow.metaflow_config import DATATOOLS_CLIENT_PARAMS

    params = dict(DATATOOLS_CLIENT_PARAMS)
    url = endpoint_url()
    if url:
        params["endpoint_url"] = url
    return params


def transfers(tmproot: Path | None = None):
    """Metaflow's S3 client (a context manager) for this storage: its downloads land under `tmproot`."""
    from metaflow import S3 as MetaflowS3

    tmproot = Path(tmproot or scratch_root())
    tmproot.mkdir(parents=True, exist_ok=True)
    return MetaflowS3(tmproot=str(tmproot), client_params=client_params())


_CLIENTS: dict = {}


def client(fail_fast: bool = False):
    """A boto3 S3 client. `fail_fast` (the `start` checks) gives up within seconds and is made here; otherwise it
    comes from Metaflow's AWS client provider, with Metaflow's credentials provider and retry settings."""
    if not fail_fast:
        # One client per endpoint and set of AWS settings: making one loads botocore's models (a fraction of a
        # second), and a changed environment (other credentials) must not reuse one made for the old.
        key = (endpoint_url(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
        if key not in _CLIENTS:
            from metaflow.plugins.datatools.s3.s3util import get_s3_client

            _CLIENTS[key] = get_s3_client(s3_client_params=client_params())[0]
        return _CLIENTS[key]
    import boto3
    from botocore.config import Config

    # A fresh session: boto3's default one caches the credentials it found first, for the process's life.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url(), config=Config(
        connect_timeout=3, read_timeout=10, retries={"max_attempts": 1, "mode": "standard"}))


# ------------------------------------------------------------------ the `start` check


# What a run does with its storage root, as (the IAM permission, what needs it): `start` probes each one.
PERMISSIONS = (("s3:ListBucket", "finding checkpoints to continue from"),
               ("s3:PutObject", "storing outputs and checkpoints"),
               ("s3:GetObject", "reading inputs and checkpoints"),
               ("s3:ListBucketMultipartUploads", "the cleanup at the end of the run (uploads a killed pod left open)"),
               ("s3:AbortMultipartUpload", "the cleanup at the end of the run (uploads a killed pod left open)"),
               ("s3:DeleteObject", "pruning checkpoints and the cleanup at the end of the run"))
DENIED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled")


def denied(err) -> bool:
    """Whether a storage error is a refusal (a missing permission), not an absence or a transient fault."""
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", "")) in DENIED


def _probes(s3, bucket: str, key: str):
    """(permission, call) for every permission in PERMISSIONS, in an order that leaves nothing behind when all
    succeed: the probe object and a multipart upload on it are made, read, listed, aborted and deleted."""
    upload = {}
    return [("s3:ListBucket", lambda: s3.head_bucket(Bucket=bucket)),
            ("s3:PutObject", lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"")),
            ("s3:GetObject", lambda: s3.get_object(Bucket=bucket, Key=key)["Body"].read()),
            ("s3:ListBucket", lambda: s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)),
            ("s3:PutObject", lambda: upload.update(s3.create_multipart_upload(Bucket=bucket, Key=key))),
            ("s3:ListBucketMultipartUploads", lambda: s3.list_multipart_uploads(Bucket=bucket, Prefix=key,
                                                                                MaxUploads=1)),
            ("s3:AbortMultipartUpload", lambda: s3.abort_multipart_upload(Bucket=bucket, Key=key,
                                                                          UploadId=upload["UploadId"])),
            ("s3:DeleteObject", lambda: s3.delete_object(Bucket=bucket, Key=key))]


def check_root(root: str) -> str | None:
    """None when `root` can store a run's outputs; else one line naming the location and the fix. An S3 root is
    probed within seconds: endpoint, credentials, bucket, and every permission the run will use (PERMISSIONS, the
    cleanup at its end included), each by the request that needs it; the probe leaves nothing behind."""
    kind = scheme(root)
    if kind == "":
        return None
    if kind not in _SUPPORTED:
        return (f"run.storage_root: {root!r} uses {kind}, which this pipeline cannot write; use a local path or "
                f"an s3:// URI")
    from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError,
                                     PartialCredentialsError)

    bucket, prefix = split_s3(root)
    where = endpoint_url() or "AWS S3"
    if not bucket:
        return f"run.storage_root: {root!r} names no bucket; use s3://BUCKET/PREFIX"
    s3 = client(fail_fast=True)
    probe = "/".join(p for p in (prefix, f".rlhf-write-check-{uuid.uuid4().hex[:8]}") if p)
    permission = "s3:ListBucket"
    try:
        for permission, call in _probes(s3, bucket, probe):
            call()
    except (NoCredentialsError, PartialCredentialsError):
        return (f"run.storage_root: no AWS credentials to reach bucket {bucket!r}; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a pod/instance role)")
    except EndpointConnectionError:
        return (f"run.storage_root: cannot reach the S3 endpoint {where} for bucket {bucket!r}; check "
                f"METAFLOW_S3_ENDPOINT_URL and the network")
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return (f"run.storage_root: bucket {bucket!r} does not exist at {where}; create it or point "
                    f"run.storage_root (or METAFLOW_DATASTORE_SYSROOT_S3) at a bucket that does")
        if denied(err):
            needs = dict(PERMISSIONS)[permission]
            every = ", ".join(p for p, _ in PERMISSIONS)
            return (f"run.storage_root: access to bucket {bucket!r} denied ({code}) for {permission}, which "
                    f"{needs} needs; the credentials need {every} on {root}")
        return f"run.storage_root: bucket {bucket!r} at {where} failed the {permission} check: {code or err}"
    except BotoCoreError as err:
        return f"run.storage_root: cannot use bucket {bucket!r} at {where}: {type(err).__name__}: {err}"
    finally:
        if permission != "s3:ListBucket":  # the probe object may be there: best effort, its own error said above
            with contextlib.suppress(Exception):
                s3.delete_object(Bucket=bucket, Key=probe)
    return None


# ------------------------------------------------------------------ objects and prefixes


def _keys(s3, bucket: str, prefix: str, delimiter: str = "") -> tuple[list[str], list[str]]:
    """(keys, common prefixes) under `prefix`, every page."""
    keys, prefixes = [], []
    args = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    for page in s3.get_paginator("list_objects_v2").paginate(**args):
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    return keys, prefixes


def _prefix(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    return bucket, key + "/" if key else ""


def list_files(uri: str) -> list[str]:
    """Paths (relative to `uri`) of every file under a local directory or an S3 prefix."""
    if not is_remote(uri):
        root = Path(uri)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    bucket, prefix = _prefix(uri)
    return sorted(k[len(prefix):] for k in _keys(client(), bucket, prefix)[0])


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-directories of a local directory or S3 prefix."""
    if not is_remote(uri):
        root = Path(uri)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    bucket, prefix = _prefix(uri)
    return sorted(p[len(prefix):].strip("/") for p in _keys(client(), bucket, prefix, "/")[1])


def _missing(err) -> bool:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound")


def read_text(uri: str) -> str:
    """A file's text; FileNotFoundError when there is none."""
    if not is_remote(uri):
        return Path(uri).read_text()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except ClientError as err:
        if _missing(err):
            raise FileNotFoundError(uri) from None
        raise


def exists(uri: str) -> bool:
    """Whether a file (an object) is at `uri`."""
    if not is_remote(uri):
        return Path(uri).is_file()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as err:
        if _missing(err):
            return False
        raise


def write_text(uri: str, text: str) -> None:
    """A small file (a marker), written whole."""
    if not is_remote(uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text(text)
        return
    bucket, key = split_s3(uri)
    client().put_object(Bucket=bucket, Key=key, Body=text.encode())


def delete(uri: str, names: list[str]) -> None:
    """Delete `names` (relative paths) under `uri`, in the order given."""
    if not is_remote(uri):
        for name in names:
            (Path(uri) / name).unlink(missing_ok=True)
        return
    bucket, prefix = _prefix(uri)
    s3 = client()
    for name in names:
        s3.delete_object(Bucket=bucket, Key=prefix + name)


def upload_dir(local: Path, uri: str, *, last: tuple[str, ...] = (), skip_top: tuple[str, ...] = ()) -> None:
    """Upload every file under `local` to the S3 prefix `uri`; the files named in `last` (relative paths) after
    all others, in that order, so a reader that waits for them never sees a partial directory. Top-level entries
    named in `skip_top` stay behind (e.g. checkpoints, already uploaded as they were written)."""
    local = Path(local)
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.relative_to(local).parts[0] not in skip_top]
    tail = [local / name for name in last if (local / name).is_file()]
    body = [(join(uri, p.relative_to(local).as_posix()), p) for p in files if p not in tail]
    if sum(p.stat().st_size for _, p in body) >= BULK_BYTES:
        with transfers() as s3:
            s3.put_files([(u, str(p)) for u, p in body])
    else:
        s3 = client()
        for u, p in body:
            s3.upload_file(str(p), *split_s3(u))
    s3 = client()
    for path in tail:
        s3.upload_file(str(path), *split_s3(join(uri, path.relative_to(local).as_posix())))


def download_dir(uri: str, local: Path) -> Path:
    """Download the S3 prefix `uri` into `local`, atomically: a temporary sibling renamed into place, so an
    interrupted download never looks like a finished one. An existing `local` is replaced."""
    local = Path(local)
    bucket, prefix = _prefix(uri)
    s3 = client()
    objects = [(o["Key"], o["Size"]) for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                             Prefix=prefix)
               for o in page.get("Contents", [])]
    if not objects:
        raise Gone(f"nothing stored at {uri}")
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".tmp-{local.name}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            _download(s3, bucket, prefix, objects, tmp, local.parent)
        except Exception as err:
            if _missing(err) or type(err).__name__ == "MetaflowS3NotFound":
                raise Gone(f"{uri} changed while it was being downloaded ({type(err).__name__}: {err})") from err
            raise
        if local.exists():
            shutil.rmtree(local)
        os.replace(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def _download(s3, bucket: str, prefix: str, objects: list[tuple[str, int]], tmp: Path, tmproot: Path) -> None:
    """Every object under `prefix` into the directory `tmp`, through metaflow.S3's workers when they are large."""
    if sum(size for _, size in objects) >= BULK_BYTES:
        with transfers(tmproot) as mf:
            for obj in mf.get_many([f"s3://{bucket}/{key}" for key, _ in objects]):
                target = tmp / obj.url[len(f"s3://{bucket}/{prefix}"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(obj.path, target)
        return
    for key, _ in objects:
        target = tmp / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))


def delete_tree(uri: str | Path) -> int:
    """Delete everything under a local directory or an S3 prefix; returns how many files went."""
    if not is_remote(uri):
        root = Path(uri)
        count = sum(1 for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
        shutil.rmtree(root, ignore_errors=True)
        return count
    bucket, prefix = _prefix(str(uri))
    s3 = client()
    keys = _keys(s3, bucket, prefix)[0]
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
    return len(keys)


def abort_uploads(uri: str | Path) -> int:
    """Abort the multipart uploads still open under an S3 prefix (those of killed processes, which S3 keeps — and
    bills — until aborted); nothing to do for a local directory. Returns how many were aborted."""
    if not is_remote(uri):
        return 0
    bucket, prefix = _prefix(str(uri))
    s3 = client()
    aborted = 0
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted += 1
    return aborted


def copy_dir(src: str | Path, dst: str | Path) -> str:
    """Copy a directory between any two places, local or S3: a local copy or a download lands atomically (a
    temporary sibling renamed into place); an upload goes file by file (readers wait for a marker). Returns `dst`."""
    src, dst = str(src), str(dst)
    if is_remote(src) and is_remote(dst):
        raise StorageError(f"cannot copy {src} to {dst}: one side must be local")
    if is_remote(src):
        download_dir(src, Path(dst))
    elif is_remote(dst):
        upload_dir(Path(src), dst)
    else:
        atomic_dir(Path(dst), lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
    return dst


def fetch_dir(uri: str | Path, local: Path, complete=None) -> Path:
    """A local directory holding what is at `uri`: `uri` itself when it is local; else downloaded into `local`
    (kept when `complete(local)` says an earlier download finished)."""
    if not is_remote(uri):
        return Path(uri)
    local = Path(local)
    if not (complete and complete(local)):
        print(f"[checkpoints] downloading checkpoint {uri}", flush=True)
        download_dir(str(uri), local)
    return local


def mirror_of(uri: str | None) -> str | None:
    """Where a stage also stores what it writes locally: `uri` when it is remote (its attempt's S3 prefix); None
    when it is the stage's own local directory."""
    return uri if is_remote(uri) else None


# ------------------------------------------------------------------ atomic local files and directories


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_dir(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool] | None = None
               ) -> Path:
    """Run build(tmp) in a temporary sibling and rename it to `final`; skip if `final` is already complete."""
    final = Path(final)
    complete = is_complete or (lambda p: p.exists())
    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        build(tmp)
        _fsync_tree(tmp)
        if complete(final):  # another process finished the same work first
            shutil.rmtree(tmp)
        else:
            if final.exists():  # an incomplete leftover from a crash
                shutil.rmtree(final)
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON via a temp file, fsync and rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------ local scratch


def scratch_root() -> Path:
    """Local working space for stages whose outputs live in S3 (`RLHF_SCRATCH_DIR`, default under the system's
    temp dir). Nothing here is needed after a stage has uploaded its outputs."""
    return Path(os.environ.get("RLHF_SCRATCH_DIR") or Path(tempfile.gettempdir()) / "rlhf-scratch")


def localize(uri: str | None, scratch: Path | None = None) -> str | None:
    """A local path for an input: an S3 URI is downloaded into `scratch` (default: the scratch root's `inputs/`,
    named by the URI, reused while it is there); local paths and hub ids pass through. Whoever owns `scratch`
    frees it (a stage's workspace deletes its own when the stage ends)."""
    if uri is None or not is_remote(uri):
        return uri
    if scheme(uri) != S3:
        raise StorageError(f"cannot read {uri!r}: only local paths and s3:// URIs are supported")
    cache = (scratch or scratch_root() / "inputs") / hashlib.sha1(uri.encode()).hexdigest()[:16]
    if not cache.exists():
        print(f"[storage] downloading {uri}", flush=True)
        download_dir(uri, cache)
    return str(cache)
