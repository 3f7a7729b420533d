"""pod_runner.py PACKAGE_URL COMMAND...: one task attempt run the way a Kubernetes pod runs it — sharing nothing with
the machine that launched it that a real pod would not have.

The pod gets a directory of its own, `<PODSIM_ROOT>/pod-XXXX/`, deleted when the attempt ends (so a failed
attempt's files are gone before its retry starts), laid out like the project's image:

    image/                the image's WORKDIR (/opt/rlhf in the Dockerfile): a *decoy* copy of the project whose
      rlhf_lib/           `rlhf_lib` raises on import, and on PYTHONPATH as the image's ENV puts it
      metaflow/           where the pod entrypoint extracts Metaflow's code package (flow file at the top, the
                          project under .mf_code/, which the entrypoint prepends to PYTHONPATH)
    home/  tmp/           its own empty HOME and TMPDIR (and so its own scratch and caches)

The environment is built from nothing, as the Kubernetes and Batch decorators build a pod's: Metaflow's settings as
`METAFLOW_*` variables (the launching user's resolved configuration; no ~/.metaflowconfig), the secrets a pod
would mount (AWS keys, W&B key), the image's ENV (PATH, PYTHONPATH, HF_HUB_OFFLINE, WANDB_MODE); none of the
launcher's `RLHF_*` variables or its HOME.

Where the machine allows it (`unshare -m`, as root), the command runs chrooted in a mount namespace holding only the
system directories, the Python installation (the image's interpreter and site-packages), this extension, the
pod's own directory and the metadata directory (standing in for the metadata service): the checkout, the
launcher's home, other pods' scratch and the local datastore are not there at all.
"""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

import boto3

DECOY = ('raise ImportError("the image\'s own copy of rlhf_lib was imported: a pod must run the code package of '
         'the run, not what the image holds")\n')
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "WANDB_API_KEY",
           "HF_TOKEN")
IMAGE_ENV = ("HF_HUB_OFFLINE", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS")
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc")
EXTENSION = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def metaflow_settings() -> dict:
    """The launching user's resolved Metaflow configuration, as the variables a pod gets."""
    from metaflow import metaflow_config as mc

    values = {"METAFLOW_DEFAULT_DATASTORE": mc.DEFAULT_DATASTORE, "METAFLOW_DATASTORE_SYSROOT_S3":
              mc.DATASTORE_SYSROOT_S3, "METAFLOW_S3_ENDPOINT_URL": mc.S3_ENDPOINT_URL,
              "METAFLOW_DEFAULT_METADATA": mc.DEFAULT_METADATA,
              # The metadata "service": a directory both the launcher and the pods see.
              "METAFLOW_DATASTORE_SYSROOT_LOCAL": mc.DATASTORE_SYSROOT_LOCAL, "METAFLOW_USER": "pod-user"}
    return {k: str(v) for k, v in values.items() if v}


def pod_env(pod: str, workdir: str, image: str) -> dict:
    env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin", "HOME": f"{pod}/home",
           "TMPDIR": f"{pod}/tmp", "USER": "pod-user", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
           # the pod entrypoint's `export PYTHONPATH=$(pwd)/.mf_code:$PYTHONPATH`, the image's ENV PYTHONPATH, and
           # this extension (in a real image, Metaflow's own plugins are in site-packages)
           "PYTHONPATH": os.pathsep.join([f"{workdir}/.mf_code", image, EXTENSION]),
           "METAFLOW_EXTRACTED_ROOT": workdir, **metaflow_settings(),
           # What Metaflow's Kubernetes plugin sets in every pod it starts (a task tells it runs in a pod by it).
           "METAFLOW_KUBERNETES_WORKLOAD": "1"}
    env.update({k: os.environ[k] for k in SECRETS + IMAGE_ENV if k in os.environ})
    return env


def isolation_script(pod: str, command: list[str], env: dict, workdir: str, hosts: str | None = None) -> str | None:
    """A shell script that, in a new mount namespace, builds the pod's root and runs `command` chrooted there;
    None where this machine cannot (not root, or no unshare). `hosts`: a file to see as /etc/hosts (cluster DNS)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("chroot"):
        return None
    root = f"{pod}/root"
    keep = [sys.base_prefix, sys.prefix, EXTENSION, pod]
    if env.get("METAFLOW_DATASTORE_SYSROOT_LOCAL"):
        os.makedirs(env["METAFLOW_DATASTORE_SYSROOT_LOCAL"], exist_ok=True)
        keep.append(env["METAFLOW_DATASTORE_SYSROOT_LOCAL"])
    lines = ["set -e", "mount --make-rprivate /", f"mkdir -p {root}"]
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            lines.append(f"ln -s {shlex.quote(os.readlink(d))} {root}{d}")
        elif os.path.isdir(d):
            lines += [f"mkdir -p {root}{d}", f"mount --rbind {d} {root}{d}", f"mount -o remount,bind,ro {root}{d}"]
    if hosts:
        lines.append(f"mount --bind {shlex.quote(hosts)} {root}/etc/hosts")
    for d in ("/dev", "/proc", "/sys"):
        lines += [f"mkdir -p {root}{d}", f"mount --rbind {d} {root}{d}"]
    # A /tmp of its own (an empty tmpfs), then what the pod may see, at the paths it has outside.
    lines += [f"mount -t tmpfs -o size=4g tmpfs {root}/dev/shm", f"mkdir -p {root}/tmp",
              f"mount -t tmpfs tmpfs {root}/tmp"]
    for path in dict.fromkeys(keep):  # Python, the venv (the image's site-packages), this extension, the pod, metadata
        real = os.path.realpath(path)
        lines += [f"mkdir -p {root}{path}", f"mount --bind {shlex.quote(real)} {root}{shlex.quote(path)}"]
    env_args = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    inner = f"cd {shlex.quote(workdir)} && exec {' '.join(shlex.quote(c) for c in command)}"
    lines.append(f"exec chroot {root} /usr/bin/env -i {env_args} /bin/sh -c {shlex.quote(inner)}")
    return "\n".join(lines)


def pod_command(command: list[str]) -> list[str]:
    """The step command as a pod runs it: Metaflow's local runtime adds `--local-config-file <a temp file on the
    launching machine>`; the Kubernetes and Batch decorators leave it out, and a pod reads the run's config
    values from the code package instead."""
    out, skip = [], False
    for arg in command:
        if skip:
            skip = False
        elif arg == "--local-config-file":
            skip = True
        elif not arg.startswith("--local-config-file="):
            out.append(arg)
    return out


def main() -> int:
    url, command = sys.argv[1], pod_command(sys.argv[2:])
    pod = tempfile.mkdtemp(prefix="pod-", dir=os.environ.get("PODSIM_ROOT"))
    image, workdir = f"{pod}/image", f"{pod}/image/metaflow"
    for d in (f"{pod}/home", f"{pod}/tmp", f"{image}/rlhf_lib", workdir):
        os.makedirs(d)
    with open(f"{image}/rlhf_lib/__init__.py", "w") as fh:
        fh.write(DECOY)
    try:
        bucket, _, key = url[len("s3://"):].partition("/")
        from metaflow.metaflow_config import S3_ENDPOINT_URL

        boto3.client("s3", endpoint_url=S3_ENDPOINT_URL).download_file(bucket, key, f"{pod}/job.tar")
        with tarfile.open(f"{pod}/job.tar") as tar:
            tar.extractall(workdir, filter="data")
        os.remove(f"{pod}/job.tar")
        env = pod_env(pod, workdir, image)
        step = command[command.index("step") + 1] if "step" in command else "?"
        script = isolation_script(pod, command, env, workdir)
        how = "chrooted in its own mount namespace" if script else "env-only (no mount namespace on this machine)"
        print(f"[podsim] step {step} in pod {pod} ({how}): {sorted(os.listdir(workdir))}", flush=True)
        if script:
            return subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script]
                                  ).returncode
        return subprocess.run(command, cwd=workdir, env=env).returncode
    finally:
        shutil.rmtree(pod, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
