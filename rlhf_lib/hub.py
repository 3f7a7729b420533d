"""Where a model comes from: a local directory, or a Hugging Face hub id — pinned to one revision for the whole run.

`start` resolves every hub id the run loads to a commit (offline: the snapshot the local cache holds) and records
it (`model_revisions`); from then on the run names it `id@commit` (`pin`), and every stage loads exactly that
commit, however the hub's `main` moves meanwhile. On a cluster each step's node downloads it once, before its
processes start (`download`), into its own cache (`HF_HOME` under the pod's scratch, unless you set one), and the
stage processes load it from there without touching the network.

Weights load from safetensors, or from `pytorch_model.bin` (one file or shards with an index, as the hub serves
some models, every `microsoft/deberta-v3-*` among them) through torch's weights-only unpickler: never an
unrestricted pickle. `check_loadable` says in seconds, at `start`, when a model's weights or tokenizer are not
there or would not load.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

TINY = "tiny"
SEP = "@"  # `id@commit`: hub ids cannot contain it
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLED, PICKLED_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spm.model", "vocab.json", "vocab.txt", "sentencepiece.bpe.model")


class ModelError(ValueError):
    """A model reference that cannot be loaded; the message names the fix."""


def is_local(ref: str | Path) -> bool:
    """A local directory (or what is meant to be one, a Path included), not a hub id."""
    if isinstance(ref, Path):
        return True
    return ref.startswith((".", "/", "~")) or Path(ref).expanduser().exists() or not _HUB_ID.match(split(ref)[0])


def split(ref: str) -> tuple[str, str | None]:
    """(`id` or path, revision or None) of a reference; `id@commit` pins a hub model to a commit."""
    name, sep, revision = str(ref).rpartition(SEP)
    if sep and _HUB_ID.match(name) and not Path(ref).expanduser().exists():
        return name, revision
    return str(ref), None


def source(ref: str | Path) -> tuple[str, dict]:
    """What `from_pretrained` takes for a reference: (path, {}) or (id, {"cache_dir": this process's hub cache,
    "revision": the commit, when pinned})."""
    if is_local(ref):
        return str(Path(ref).expanduser()), {}
    name, revision = split(ref)
    return name, {"cache_dir": cache_dir(), **({"revision": revision} if revision else {})}


def pin(ref: str, revisions: dict[str, str]) -> str:
    """`id@commit` for a hub id `start` resolved; anything else as it is."""
    return f"{ref}{SEP}{revisions[ref]}" if ref in (revisions or {}) else ref


def offline() -> bool:
    # The hub library reads HF_HUB_OFFLINE once, at import; honour a value set after that too.
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def cache_dir() -> str:
    """The hub cache this process uses, read now (HF_HUB_CACHE, else HF_HOME/hub, else the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return str(Path(home).expanduser() / "hub")


def cached_snapshot(ref: str) -> Path | None:
    """The local snapshot directory of a hub id (at its pinned commit, else the cache's `main`), None if absent."""
    from huggingface_hub import try_to_load_from_cache

    name, revision = split(ref)
    found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir(), revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def resolve(ref: str, timeout: float = 10.0) -> str | None:
    """The commit a hub id stands for now: the local cache's snapshot when offline (or when it is cached and the
    id is pinned), else the hub's answer. None for local directories and `tiny`."""
    if ref == TINY or is_local(ref):
        return None
    name, revision = split(ref)
    snapshot = cached_snapshot(ref)
    if snapshot is not None and (offline() or revision):
        return snapshot.name
    if offline():
        raise ModelError(f"hub model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1")
    from huggingface_hub import HfApi

    return HfApi().model_info(name, revision=revision, timeout=timeout).sha


def files(ref: str) -> tuple[list[str], Path | None]:
    """(file names, local directory or None) of a model: a local directory's, a cached snapshot's, or — online,
    not cached — the hub's file list at its revision (nothing downloaded)."""
    if is_local(ref):
        root = Path(source(ref)[0])
        return (sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []), root
    snapshot = cached_snapshot(ref)
    if snapshot is not None:
        return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()), snapshot
    from huggingface_hub import HfApi

    name, revision = split(ref)
    return sorted(HfApi().list_repo_files(name, revision=revision)), None


def weight_files(names: list[str], root: Path | None) -> list[str]:
    """The files holding a model's weights, safetensors first: one file, or an index's shards."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PICKLED, PICKLED_INDEX)):
        if index in names:
            if root is None:
                return [index]
            shards = sorted(set(json.loads((root / index).read_text())["weight_map"].values()))
            return shards if all(s in names for s in shards) else []
        if single in names:
            return [single]
    return []


def check_pickled_weights(path: Path) -> None:
    """A `.bin` checkpoint unpickled the safe way: torch's weights-only unpickler, memory-mapped (the tensors are not
    read). One that would run code or build other objects is refused with the reason."""
    import pickle

    import torch

    try:
        torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ModelError(f"{path} is a pickle that holds more than tensors: refused, it would run code when "
                         f"loaded ({str(err).splitlines()[0][:200]}). Convert the model to safetensors, or get it "
                         f"from a source you trust") from None


def check_loadable(ref: str, key: str, trust_remote_code: bool = False) -> None:
    """Fail at once, naming the config key, when a model's config, weights or tokenizer are not there or would not
    load: a missing directory, an id neither cached nor reachable, no weight file, a pickle that is not weights
    only, no tokenizer."""
    if ref == TINY:
        return
    name, _ = split(ref)
    try:
        names, root = files(ref)
    except ModelError:
        raise
    except Exception as err:
        if offline() and not is_local(ref):
            raise ModelError(f"{key}: hub model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1. "
                             f"Download it first (`hf download {name}`), unset HF_HUB_OFFLINE, or use a local path "
                             f"or `tiny`") from None
        raise ModelError(f"{key}: cannot reach hub model {name!r} ({type(err).__name__}: {str(err)[:200]}). Check the "
                         f"id and your network/HF_TOKEN, or use a local path or `tiny`") from None
    where = f"{ref!r}" + (f" (at {root})" if root and not is_local(ref) else "")
    if "config.json" not in names:
        raise ModelError(f"{key}: {where} is not a model directory (no config.json); fix the path")
    weights = weight_files(names, root)
    if not weights:
        raise ModelError(f"{key}: {where} has a config.json but no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, "
                         f"{PICKLED} or {PICKLED_INDEX} with every shard it names); download the whole model "
                         f"(`hf download {name}`) or fix the path")
    if root is not None:
        for weight in weights:
            if weight.endswith(".bin"):
                check_pickled_weights(root / weight)
    if not any(n in names for n in TOKENIZER_FILES) and "tokenizer_config.json" not in names:
        raise ModelError(f"{key}: {where} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the tokenizer beside "
                         f"the model")


def download(ref: str) -> str:
    """Make a pinned hub model local before a stage's processes start (one download per node; they then load it
    offline). Returns the snapshot directory; a local directory is returned as it is."""
    if ref == TINY or is_local(ref):
        return ref
    snapshot = cached_snapshot(ref)
    if snapshot is not None:
        return str(snapshot)
    from huggingface_hub import snapshot_download

    name, revision = split(ref)
    print(f"[hub] downloading {name} at {revision or 'main'} into {cache_dir()}", flush=True)
    return snapshot_download(name, revision=revision, cache_dir=cache_dir())
