"""`kube-commands OUT`: the command Metaflow's runtime launches for each step of a run's route — built by Metaflow's
own code (a NativeRuntime, its Tasks, CLIArgs and every step decorator's runtime_step_cli, as Worker._launch does),
only not launched. With `--with kubernetes` each is a `kubernetes step ...` command, which tests/test_kubernetes.py
then runs against a recorder of the Kubernetes API (tests only: no cluster is involved).

The route: every step, a gang method's one-node steps when --num-parallel is 1, its gang's when it is more."""

import json
import os
from types import SimpleNamespace

from metaflow._vendor import click


@click.group()
def cli():
    pass


@cli.command("kube-commands", help="The launch command of every step of a run's route (tests only).")
@click.argument("out")
@click.option("--num-parallel", default=1, type=int)
@click.pass_obj
def kube_commands(obj, out, num_parallel):
    from metaflow.cli_components.run_cmds import before_run
    from metaflow.runtime import CLIArgs, NativeRuntime
    from metaflow.unbounded_foreach import UBF_CONTROL
    from metaflow.user_configs.config_parameters import dump_config_values

    before_run(obj, [], [])
    runtime = NativeRuntime(obj.flow, obj.graph, obj.flow_datastore, obj.metadata, obj.environment, obj.package,
                            obj.logger, obj.entrypoint, obj.event_logger, obj.monitor)
    obj.flow._set_constants(obj.graph, {}, obj.config_options)
    runtime.persist_constants()
    config_file = os.path.join(os.path.dirname(os.path.abspath(out)), "config-values.json")
    with open(config_file, "w") as fh:
        json.dump(dump_config_values(obj.flow), fh)  # as the runtime passes configs: a local config file
    paths, commands = {"_parameters": runtime._params_task.path}, {}
    for node in _route(obj.graph, num_parallel):
        parents = [paths[p] for p in node.in_funcs if p in paths] or [paths["_parameters"]]
        extra = {}
        if node.parallel_step:
            extra = dict(split_index=0, ubf_context=UBF_CONTROL, ubf_iter=SimpleNamespace(num_parallel=num_parallel))
        task = runtime._new_task(node.name, input_paths=parents, **extra)
        args = CLIArgs(task)
        for deco in task.decos:
            deco.runtime_step_cli(args, task.retries, task.user_code_retries, task.ubf_context)
        args.top_level_options["local-config-file"] = config_file
        commands[node.name] = {"args": args.get_args(), "env": {**args.get_env(), "METAFLOW_RUN_ID": task.run_id}}
        paths[node.name] = task.path
        runtime._is_cloned[task.path] = False  # as the runtime records a finished task
    with open(out, "w") as fh:
        json.dump(commands, fh, indent=1)


def _route(graph, num_parallel):
    """The steps a run takes, in order: at a switch, the case its gang layout picks."""
    order, seen = [], set()
    queue = [graph["start"]]
    while queue:
        node = queue.pop(0)
        if node.name in seen:
            continue
        seen.add(node.name)
        order.append(node)
        nexts = node.out_funcs
        if node.type == "split-switch":
            nexts = [node.switch_cases["gang" if num_parallel > 1 else "one_node"]]
        queue += [graph[n] for n in nexts]
    return order
