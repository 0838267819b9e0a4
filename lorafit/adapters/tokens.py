"""Tokens added to the vocabulary (a chat template's ``<|im_end|>``): their rows are trained.

When a data option adds special tokens to the tokenizer (:mod:`lorafit.data.chat`), the model's
input embedding and output layer are resized (the new rows start at the mean of the old ones, the
same on every load), and both are wrapped in :class:`TokenRows`: the frozen layer plus a trainable
fp32 ``token_rows`` tensor (zero at first) added to the rows of the new ids only. Everything else of
the vocabulary stays frozen, as PEFT's ``trainable_token_indices`` does.

A ``TokenRows`` layer follows the adapter-layer convention of :mod:`lorafit.adapters` — ``base``,
``merged_weight()``, ``merge()`` / ``unmerge()``, ``disabled``; its state is ``token_rows`` — so
it is saved with the adapter, loaded back after the same resize, and folded by ``lorafit merge``
into the resized base, which is written with the grown vocabulary and the tokenizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorafit.config import ConfigError


class TokenRows(nn.Module):
    """A frozen embedding or output layer whose rows ``first … first + count − 1`` get a trainable offset."""

    def __init__(self, base: nn.Embedding | nn.Linear, first: int, count: int) -> None:
        super().__init__()
        self.base = base
        self.first = first
        self.token_rows = nn.Parameter(torch.zeros(count, base.weight.shape[1], device=base.weight.device,
                                                   dtype=torch.float32))
        self.merged = False
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:
        """The frozen layer's weight (what code asking ``get_input_embeddings().weight`` expects)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled or self.merged:
            return out
        first, end = self.first, self.first + self.token_rows.shape[0]
        if isinstance(self.base, nn.Embedding):                  # x: token ids
            new = (x >= first) & (x < end)
            extra = F.embedding((x - first).clamp(0, end - first - 1), self.token_rows) * new.unsqueeze(-1)
            return out + extra.to(out.dtype)
        extra = F.linear(x.to(self.token_rows.dtype), self.token_rows)   # x: hidden states → the new logits
        out[..., first:end] += extra.to(out.dtype)       # in place: no second batch × length × vocab tensor
        return out

    def merged_weight(self) -> torch.Tensor:
        weight = self.base.weight.float().clone()
        if not self.merged:
            weight[self.first:self.first + self.token_rows.shape[0]] += self.token_rows
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight.data = self.merged_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            weight = self.base.weight.float()
            weight[self.first:self.first + self.token_rows.shape[0]] -= self.token_rows
            self.base.weight.data = weight.to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"trainable rows {self.first}…{self.first + self.token_rows.shape[0] - 1}"


@torch.no_grad()
def add_token_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, added: list[str]) -> dict[str, TokenRows]:
    """Give the ``added`` tokens (already in ``tokenizer``) rows that train: resize the model's input
    and output embeddings if the vocabulary outgrew them, start the new rows at the mean row, and wrap
    both layers in :class:`TokenRows`. Returns the wrapped layers by module name ({} if none added).

    Raises:
        ConfigError: the model ties its input and output embeddings (one matrix, two roles: not supported).
    """
    if not added:
        return {}
    ids = tokenizer.convert_tokens_to_ids(added)
    first, count = min(ids), max(ids) - min(ids) + 1
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        raise ConfigError(f"The chat template needs {', '.join(added)}, which the vocabulary lacks, but "
                          f"{type(model).__name__} ties its input and output embeddings, and training new rows of a "
                          f"tied matrix is not supported. Pick a template the vocabulary already has (data.template, "
                          f"or the tokenizer's own), or set data.add_special_tokens=false to see what is missing.")
    if len(tokenizer) > embedding.weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    wrapped = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is None:
            continue
        layer.weight.requires_grad_(False)
        mean_row = layer.weight[:first].float().mean(0)          # the same on every load
        layer.weight[first:first + count] = mean_row.to(layer.weight.dtype)
        if getattr(layer, "bias", None) is not None:
            layer.bias.requires_grad_(False)
            layer.bias[first:first + count] = 0
        name = names[id(layer)]
        rows = TokenRows(layer, first, count)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, rows)
        wrapped[name] = rows
    return wrapped
