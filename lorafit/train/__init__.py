"""The training loop (``trainer.py``), its event protocol (``callbacks.py``) and checkpoints."""
