STEP_DECORATORS_DESC = [("podsim", ".podsim_decorator.PodSimDecorator")]
