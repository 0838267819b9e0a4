"""The ``init`` config group: how adapter factors start (and, for some schemes, how W0 is rewritten).

Each option is a dataclass with ``apply(layers)``, called once right after the adapters are
attached; ``layers`` maps module names to adapter layers. Data-driven schemes also return
trainer callbacks from ``callbacks()``.
"""
