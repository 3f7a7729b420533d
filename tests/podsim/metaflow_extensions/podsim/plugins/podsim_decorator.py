"""`--with podsim`: each task attempt runs in a fresh directory holding only the extracted code package."""

import os
import sys

from metaflow.decorators import StepDecorator

POD_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pod_runner.py")


class PodSimDecorator(StepDecorator):
    name = "podsim"
    defaults = {}
    package_url = None  # one upload per run, shared by every step (as @kubernetes does)

    def step_init(self, flow, graph, step, decos, environment, flow_datastore, logger):
        if flow_datastore.TYPE != "s3":
            raise RuntimeError("podsim runs pods against an S3 datastore; configure one")
        self.flow_datastore = flow_datastore

    def runtime_init(self, flow, graph, package, run_id):
        self.package = package

    def runtime_task_created(self, task_datastore, task_id, split_index, input_paths, is_cloned, ubf_context):
        if not is_cloned and PodSimDecorator.package_url is None:
            PodSimDecorator.package_url = self.flow_datastore.save_data([self.package.blob], len_hint=1)[0][0]

    def runtime_step_cli(self, cli_args, retry_count, max_user_code_retries, ubf_context):
        script = os.path.basename(cli_args.entrypoint[-1])
        cli_args.entrypoint = [sys.executable, POD_RUNNER, PodSimDecorator.package_url, sys.executable, script]
