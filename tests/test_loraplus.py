"""LoRA+'s weight-decay groups, unit by unit (the parameter groups on real models: test_step_rules.py)."""

from __future__ import annotations

from torch import nn

from lorafit.adapters.lora import LoRAConfig
from lorafit.optim.loraplus import LoRAPlusConfig


def test_loraplus_decays_neither_biases_nor_normalisation_weights() -> None:
    """As the authors' code and PEFT: ``weight_decay`` on every tensor but biases and the weights of
    ``*norm*`` modules (BERT's ``LayerNorm``, Llama's ``input_layernorm`` and ``norm``). Kills decaying
    the normalisation weights (a rule that looks at the name's ``bias`` only)."""
    layer = LoRAConfig(r=2, alpha=4).wrap(nn.Linear(4, 4))
    layer.base.weight.requires_grad_(False)
    model = nn.ModuleDict({"q_proj": layer, "head": nn.Linear(4, 2), "LayerNorm": nn.LayerNorm(4),
                           "input_layernorm": nn.LayerNorm(4), "norm": nn.LayerNorm(4)})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = LoRAPlusConfig(lr=1e-3, weight_decay=0.1).build(named)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    want = {"q_proj.lora_A": 0.1, "q_proj.lora_B": 0.1, "q_proj.base.bias": 0.0, "head.weight": 0.1, "head.bias": 0.0,
            "LayerNorm.weight": 0.0, "LayerNorm.bias": 0.0, "input_layernorm.weight": 0.0,
            "input_layernorm.bias": 0.0, "norm.weight": 0.0, "norm.bias": 0.0}
    assert {n: decay[id(p)] for n, p in named} == want
