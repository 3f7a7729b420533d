"""A toy alignment method, added the way a new method is: a registry row (here) and a stage module (stage.py)."""

from rlhf_lib import methods

TOY = methods.register(methods.Method("toy", "Toy", ("sft_model",), online=False, stage="toy_methods.stage",
                                      section=None))
