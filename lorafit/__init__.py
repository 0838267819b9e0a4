"""lorafit: LoRA-family fine-tuning from YAML recipes, with merge and evaluation built in."""

__version__ = "0.1.0"
