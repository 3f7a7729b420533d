"""pod_runner.py PACKAGE_URL COMMAND...: what a pod's entrypoint does, in a new empty directory.

Download the code package from the datastore, extract it, put `.mf_code` on PYTHONPATH (the pod's
`export PYTHONPATH=$(pwd)/.mf_code:...`), run COMMAND there, delete the directory, exit with COMMAND's status.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import boto3


def main() -> int:
    url, command = sys.argv[1], sys.argv[2:]
    pod = tempfile.mkdtemp(prefix="pod-", dir=os.environ.get("PODSIM_ROOT"))
    try:
        bucket, _, key = url[len("s3://"):].partition("/")
        from metaflow.metaflow_config import S3_ENDPOINT_URL  # a compiled pod gets it as an env var

        boto3.client("s3", endpoint_url=S3_ENDPOINT_URL).download_file(
            bucket, key, os.path.join(pod, "job.tar"))
        with tarfile.open(os.path.join(pod, "job.tar")) as tar:
            tar.extractall(pod, filter="data")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(pod, ".mf_code"), env.get("PYTHONPATH")) if p)
        env["METAFLOW_EXTRACTED_ROOT"] = pod
        step = command[command.index("step") + 1] if "step" in command else "?"
        print(f"[podsim] step {step} in pod {pod}: {sorted(os.listdir(pod))}", flush=True)
        return subprocess.run(command, cwd=pod, env=env).returncode
    finally:
        shutil.rmtree(pod, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
