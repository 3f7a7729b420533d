"""Benchmark: what S3 storage costs a run — the same flow with stage outputs on the local disk and in S3.

    python bench/storage_overhead.py                       # configs/tiny.toml, 2 rounds
    python bench/storage_overhead.py --config configs/compare.toml --rounds 1
    python bench/storage_overhead.py --replay-run RUN_ID       # seconds: a finished local run's outputs, replayed

Starts moto's S3 server on 127.0.0.1 (a stand-in for S3: it measures our download/upload/mirroring work, not
network), then runs the flow alternately with `run.storage_root` local and `s3://…`, alone on the machine, and
prints a Markdown table of wall times, their ratio, and the bytes the S3 run stored. Both runs must report the
same evaluation figures: S3 changes where files live, not what is computed.

`--replay-run` starts no flow: it sends each stage output of a finished run on the local disk through the storage
layer the stages use (rlhf_lib/storage.py) to the S3 server and back — one upload and one download per output, a
lower bound (a run downloads the models each later stage reads) — and prints the seconds beside the run's wall.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_lib import env  # noqa: E402
from rlhf_lib.config import dump_toml  # noqa: E402

env.configure()  # the project's Metaflow datastore (a replayed run is read through the Client API)

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("moto server did not start")


def figures(output: str) -> str:
    """A run's evaluation figures, from its output (`end`'s summary lines)."""
    return "; ".join(line.split("] ", 1)[-1] for line in output.splitlines() if "win-rate vs SFT" in line)


def _run(config: Path, env: dict) -> tuple[float, str]:
    started = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "rlhf_flow.py"), "--config", "config", str(config),
                           "run"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return time.time() - started, figures(proc.stdout)


def _bucket(url: str):
    import boto3

    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                      region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
    s3.create_bucket(Bucket="bench")
    return s3


def replay(run_id: str) -> None:
    """A finished local run's stage outputs up to the S3 server and back through rlhf_lib.storage, timed."""
    from metaflow import Run, namespace

    namespace(None)
    run = Run(f"RLHFFlow/{run_id}")
    outputs = Path(run.data.storage_root) / "RLHFFlow" / run_id
    wall = (run.finished_at - run.created_at).total_seconds()
    server, url = _server()
    os.environ.update({**CREDENTIALS, "METAFLOW_S3_ENDPOINT_URL": url})
    from rlhf_lib import storage

    _bucket(url)
    rows, work = [], Path(tempfile.mkdtemp(prefix="storage-replay-"))
    try:
        for stage in sorted(p for p in outputs.iterdir() if p.is_dir()):
            size = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file())
            started = time.time()
            storage.upload_dir(stage, f"s3://bench/replay/{stage.name}")
            uploaded = time.time()
            storage.download_dir(f"s3://bench/replay/{stage.name}", work / stage.name)
            rows.append((stage.name, size, uploaded - started, time.time() - uploaded))
    finally:
        server.terminate()
    print(f"\nrun {run_id} ({run.data.run_config['run']['name']}), {platform.node()} ({os.cpu_count()} cores), "
          f"{time.strftime('%Y-%m-%d')}: each stage output once up to S3 (moto on 127.0.0.1) and back\n")
    print("| stage output | MB | upload (s) | download (s) |\n|---|---|---|---|")
    for name, size, up, down in rows:
        print(f"| {name} | {size / 1e6:.1f} | {up:.2f} | {down:.2f} |")
    moved = sum(up + down for *_, up, down in rows)
    print(f"| **all** | **{sum(r[1] for r in rows) / 1e6:.1f}** | | |\n\n{moved:.1f} s of transfers beside the "
          f"run's {wall:.0f} s ({moved / wall:.1%}): a lower bound of what S3 storage adds to it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replay-run", default=None, metavar="RUN_ID",
                        help="start no flow: replay this finished local run's outputs to S3 and back, timed")
    args = parser.parse_args()
    if args.replay_run:
        return replay(args.replay_run)
    server, url = _server()
    work = Path(tempfile.mkdtemp(prefix="storage-bench-"))
    env = {**os.environ, **CREDENTIALS, "METAFLOW_S3_ENDPOINT_URL": url, "RLHF_SCRATCH_DIR": str(work / "scratch")}
    s3 = _bucket(url)
    base = tomllib.loads(Path(args.config).read_text())
    times: dict[str, list[float]] = {"local": [], "s3": []}
    reported: dict[str, str] = {}  # each storage's evaluation figures (`figures`)
    try:
        for r in range(args.rounds):
            for kind in ("local", "s3"):
                root = str(work / f"local-{r}") if kind == "local" else f"s3://bench/round-{r}"
                cfg = work / f"{kind}-{r}.toml"
                cfg.write_text(dump_toml({**base, "run": {**base.get("run", {}), "storage_root": root}}))
                seconds, reported[kind] = _run(cfg, env)
                times[kind].append(seconds)
                print(f"round {r + 1} {kind}: {seconds:.0f} s  {reported[kind]}", flush=True)
        stored = sum(o["Size"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench",
                                                                                         Prefix="round-0/")
                     for o in page.get("Contents", []))
    finally:
        server.terminate()
    local, remote = min(times["local"]), min(times["s3"])
    print(f"\n{platform.node()} ({os.cpu_count()} cores), {time.strftime('%Y-%m-%d')}, config {args.config}, "
          f"best of {args.rounds}\n")
    print("| storage | wall (s) | vs local | stored in S3 |\n|---|---|---|---|")
    print(f"| local disk | {local:.0f} | 1.00× | – |")
    print(f"| S3 (moto on 127.0.0.1) | {remote:.0f} | {remote / local:.2f}× | {stored / 1e6:.1f} MB |")
    print(f"\nsame figures: {reported['local'] == reported['s3']} ({reported['s3']})")


if __name__ == "__main__":
    main()
