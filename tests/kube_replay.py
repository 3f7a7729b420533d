"""Run what Kubernetes would run: the pods of a Job or JobSet body that Metaflow's own submission code sent to the
API (tests/kube_recorder.py), each container's command, arguments and environment exactly as recorded, in a
simulated pod of its own (tests/podsim's: an empty image directory with a decoy `rlhf_lib`, its own HOME and
TMPDIR, chrooted in a mount namespace of its own).

Replaced are only the parts a cluster's own machinery provides:
- the image: its ENV and WORKDIR read from the project's Dockerfile, with its paths (`/opt/venv`, `/opt/rlhf`) as
  this environment's interpreter and the pod's image directory;
- the kubelet's and the JobSet controller's values (`valueFrom.fieldRef`): the pod's name, namespace, uid, service
  account, node IP, and the JobSet's job-index / jobset-name / restart-attempt annotations;
- cluster DNS: every pod's name (`<pod>.<subdomain>.<namespace>.svc.cluster.local`, the control pod's among them)
  resolves to 127.0.0.1 through the pod's own /etc/hosts;
- credentials (a Kubernetes secret or a pod role): the S3 keys given.
Nothing else: a wrong port, master address or world size in the recorded body breaks the run here as it would on a
cluster. The JobSet controller itself (scheduling, its failure policy), image pulls and NCCL are not simulated.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "podsim" / "metaflow_extensions" / "podsim" / "plugins"))

import pod_runner  # noqa: E402  (tests/podsim: the simulated pod)

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_PATHS = {"/opt/venv": sys.prefix}  # and "/opt/rlhf": the pod's image directory, per pod


@dataclass
class Pod:
    name: str
    namespace: str
    spec: dict
    annotations: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def dns_name(self) -> str | None:
        """The name cluster DNS gives a pod with a hostname and subdomain (a JobSet's pods)."""
        if not self.spec.get("subdomain"):
            return None
        return f"{self.name}.{self.spec['subdomain']}.{self.namespace}.svc.cluster.local"


def pods_of(body: dict) -> list[Pod]:
    """The pods a Job or a JobSet asks for, named and annotated as the Job and JobSet controllers name them."""
    meta = body["metadata"]
    if body["kind"] == "Job":
        template = body["spec"]["template"]
        return [Pod(f"{meta['name']}-{uuid.uuid4().hex[:5]}", meta["namespace"], template["spec"],
                    dict(template["metadata"].get("annotations") or {}), dict(template["metadata"].get("labels") or {}))]
    assert body["kind"] == "JobSet", body["kind"]
    pods = []
    for replicated in body["spec"]["replicatedJobs"]:
        job = replicated["template"]["spec"]
        for index in range(replicated.get("replicas", 1)):
            for k in range(job.get("parallelism", 1)):
                template = job["template"]
                annotations = {**(template["metadata"].get("annotations") or {}),
                               "jobset.sigs.k8s.io/jobset-name": meta["name"],
                               "jobset.sigs.k8s.io/replicatedjob-name": replicated["name"],
                               "jobset.sigs.k8s.io/job-index": str(index),
                               "jobset.sigs.k8s.io/restart-attempt": "0"}
                pods.append(Pod(f"{meta['name']}-{replicated['name']}-{index}-{k}", meta["namespace"],
                                template["spec"], annotations, dict(template["metadata"].get("labels") or {})))
    return pods


def field_value(pod: Pod, path: str) -> str:
    """What the kubelet puts in an env var `valueFrom.fieldRef.fieldPath`. An unknown path fails the replay: a
    field nobody provides here must be looked at, not guessed."""
    simple = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": pod.uid,
              "spec.serviceAccountName": pod.spec.get("serviceAccountName") or "default",
              "spec.nodeName": "podsim-node", "status.hostIP": "127.0.0.1", "status.podIP": "127.0.0.1"}
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
    if m:
        return (pod.annotations if m.group(1) == "annotations" else pod.labels)[m.group(2)]
    raise KeyError(f"no kubelet value for fieldRef {path!r}")


def container_env(pod: Pod, container: dict, secrets: dict) -> dict:
    """The container's environment as recorded, each `valueFrom` resolved as the kubelet resolves it."""
    env = {}
    for source in container.get("envFrom") or []:
        env.update(secrets[source["secretRef"]["name"]] if "secretRef" in source else {})
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = field_value(pod, var["valueFrom"]["fieldRef"]["fieldPath"])
        elif "secretKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            raise KeyError(f"cannot resolve env var {var}")
    return env


def image_env(image_dir: str) -> tuple[dict, str]:
    """The ENV and WORKDIR of the project's Dockerfile, its paths mapped to this environment and the pod's image
    directory."""
    paths = {**IMAGE_PATHS, "/opt/rlhf": image_dir}
    env, workdir = {"PATH": SYSTEM_PATH}, "/"
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (ROOT / "Dockerfile").read_text())  # join continued lines
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "WORKDIR":
            workdir = words[1]
        if words[0] != "ENV" or len(words) < 2:
            continue
        for assignment in words[1:]:
            name, _, value = assignment.partition("=")
            value = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
            for image_path, here in paths.items():
                value = value.replace(image_path, here)
            env[name] = value
    for image_path, here in paths.items():
        workdir = workdir.replace(image_path, here)
    return env, workdir


def hosts_file(pods: list[Pod]) -> str:
    names = " ".join(p.dns_name for p in pods if p.dns_name)
    return f"127.0.0.1 localhost {names}\n::1 localhost\n"


def run_pods(body: dict, secrets: dict, root: Path, passthrough: dict, timeout: float = 900,
             alter: dict | None = None) -> list[tuple[str, int, str]]:
    """Run every pod of a recorded Job or JobSet at once, each in a simulated pod under `root`; returns (pod
    name, exit code, output) for each. `passthrough`: what stands in for the cluster's network reach (offline
    settings). `alter` (pod-name suffix -> env changes) is for checking that a wrong recorded value breaks it."""
    if os.geteuid() != 0 or not pod_runner.shutil.which("unshare"):
        raise RuntimeError("replaying pods needs a mount namespace (root and unshare): its own /etc/hosts")
    pods = pods_of(body)
    hosts = hosts_file(pods)
    procs = []
    for pod in pods:
        directory = tempfile.mkdtemp(prefix=f"{pod.name}-", dir=root)
        image = f"{directory}/image"
        for d in (f"{directory}/home", f"{directory}/tmp", f"{image}/rlhf_lib"):
            os.makedirs(d)
        Path(f"{image}/rlhf_lib/__init__.py").write_text(pod_runner.DECOY)
        Path(f"{directory}/hosts").write_text(hosts)
        container = pod.spec["containers"][0]
        env, workdir = image_env(image)
        env.update(HOME=f"{directory}/home", TMPDIR=f"{directory}/tmp", HOSTNAME=pod.name, **passthrough,
                   **secrets.get("credentials", {}))
        env.update(container_env(pod, container, secrets))  # the container's own env wins over the image's
        for suffix, changes in (alter or {}).items():
            if pod.name.endswith(suffix):
                env.update(changes)
        command = list(container.get("command") or []) + list(container.get("args") or [])
        script = pod_runner.isolation_script(directory, command, env, workdir, hosts=f"{directory}/hosts")
        procs.append((pod.name, subprocess.Popen(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                                                 script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                text=True, start_new_session=True)))
    outputs: dict[str, str] = {}

    def drain(name, proc):
        outputs[name] = proc.stdout.read()

    threads = [threading.Thread(target=drain, args=p, daemon=True) for p in procs]
    for t in threads:
        t.start()
    results, deadline = [], time.monotonic() + timeout
    for (name, proc), thread in zip(procs, threads):
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # the whole pod goes, as the kubelet kills a pod past its deadline
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        thread.join(timeout=30)
        results.append((name, code, outputs.get(name, "")))
    return results
