"""The ``optimizer`` config group (``optim`` on the command line): optimizers and step rules.

Each option is a dataclass with ``build(named_params) -> torch.optim.Optimizer`` and the
learning-rate schedule fields; step rules that need more than ``optimizer.step()`` also return
trainer callbacks from ``callbacks()``.
"""
