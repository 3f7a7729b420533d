STEP_DECORATORS_DESC = [("podsim", ".podsim_decorator.PodSimDecorator")]
CLIS_DESC = [("kube-commands", ".kube_commands.cli")]
