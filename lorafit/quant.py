"""Quantised base layers (QLoRA): bitsandbytes' ``Linear4bit`` (nf4, fp4) and ``Linear8bitLt`` (int8).

The base model is loaded quantised by transformers' own bitsandbytes integration
(:func:`lorafit.models.load_model` with ``model.quantization``); this module lets adapters and inits
meet such a layer without knowing its format:

- :func:`is_quantized` — is this linear layer's weight stored quantised?
- :func:`dense_weight` — its weight as a dense tensor (dequantised; transient, one layer at a time);
- :func:`weight_rows` — its weight to read a block of rows at a time (:class:`Rows4bit`: a 4-bit
  one dequantised block by block, never whole; :func:`lorafit.linalg.singular_triplets` reads it);
- :func:`set_dense_weight` — replace its weight by a dense one, quantised again in the layer's own
  format (an init that rewrites W0 into a residual, as PEFT does for PiSSA on a 4-bit base; 4 bits
  in chunks, :func:`quantize_4bit_chunked`);
- :class:`WeightGradients` — the gradient of the loss with respect to the (frozen, quantised) weights
  of some layers, ``Σ_tokens g xᵀ`` from forward and backward hooks: bitsandbytes layers compute no
  weight gradient, and RoSA's Fisher and LoRA-GA's init need one.

Why bitsandbytes rather than torchao's NF4: it is the format the rest of the ecosystem reads (PEFT's
QLoRA recipe, transformers' ``BitsAndBytesConfig``, vLLM's and TGI's loaders), it loads a checkpoint
quantised shard by shard through ``from_pretrained`` (a 70B base never exists in 16 bits in memory),
and it offers int8 as well; on CPU it runs a plain-PyTorch fallback (≥ 0.46), on GPUs its kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


def is_quantized(layer: nn.Module) -> bool:
    """True if ``layer`` is a bitsandbytes quantised linear layer (4-bit or 8-bit).

    Judged by the layer's class, not its weight's: under FSDP the weight is a shard (a DTensor) and,
    inside the forward, the gathered plain tensor of the packed bytes.
    """
    return bnb_kind(layer) is not None


def bnb_kind(layer: nn.Module) -> Optional[str]:
    """``"Linear4bit"`` or ``"Linear8bitLt"`` for a bitsandbytes layer (or a subclass), else None."""
    return next((cls.__name__ for cls in type(layer).__mro__ if cls.__name__ in ("Linear4bit", "Linear8bitLt")), None)


def dense_weight(layer: nn.Module, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight of a linear layer as a dense ``out × in`` tensor (``dtype``: float32 by default).

    For a quantised layer this dequantises (a new tensor, one layer's worth of memory); for a plain
    one it is the weight itself, cast only if ``dtype`` differs (treat the result as read-only). Under
    FSDP only inside the layer's forward (the weight gathered): a 4-bit weight that lost its
    ``quant_state`` there is read with the layer's, as bitsandbytes' own forward does.
    """
    weight = layer.weight
    kind = bnb_kind(layer)
    if kind == "Linear4bit":
        import bitsandbytes.functional as bnbf
        dense = bnbf.dequantize_4bit(weight.data, getattr(weight, "quant_state", None) or layer.quant_state)
    elif kind == "Linear8bitLt":
        dense = weight.data.float() * (weight.SCB.float().unsqueeze(1) / 127.0)
    else:
        dense = weight.detach()
    return dense.to(dtype or torch.float32)


class Rows4bit:
    """A 4-bit weight (bitsandbytes ``Params4bit``) read as fp32 rows, ``rows(a, b) = W[a:b]``, bit for
    bit what :func:`dense_weight` gives for those rows, without dequantising the rest.

    Blockwise 4-bit quantisation (QLoRA, §2) codes the flattened weight in blocks of ``blocksize``
    elements (two codes a byte, one absmax a block), each dequantised on its own: rows a..b are the
    elements ``a·n .. b·n`` of the blocks that cover them, which start on a byte (``blocksize`` is
    even). Those blocks are dequantised by bitsandbytes' ``dequantize_4bit`` in pieces of about
    ``chunk`` elements and the rows cut out of them, so a call holds its fp32 rows and about 3·chunk
    words more. A nested (``compress_statistics``) absmax is decompressed once, for the whole layer,
    as ``dequantize_4bit`` would (1/blocksize of the layer in fp32).
    """

    def __init__(self, layer: nn.Module, chunk: int = 2 ** 18) -> None:
        import bitsandbytes.functional as bnbf
        weight = layer.weight
        state = getattr(weight, "quant_state", None) or layer.quant_state
        absmax = state.absmax
        if state.nested:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
            absmax += state.offset
        self.shape = torch.Size(state.shape)
        self.dtype = torch.float32
        self.device = weight.device
        self._absmax = absmax.float()
        self._packed = weight.data.reshape(-1).view(torch.uint8)
        self._state = state
        self._step = max(state.blocksize, chunk // state.blocksize * state.blocksize)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        m, n = self.shape
        stop = min(stop, m)
        out = torch.empty(stop - start, n, dtype=torch.float32, device=self.device)
        flat, lo, hi = out.view(-1), start * n, stop * n
        size, end = self._state.blocksize, m * n
        last_block_end = min(-(-hi // size) * size, end)
        pos = lo
        while pos < hi:
            first = pos // size * size
            last = min(first + self._step, last_block_end)
            upto = min(last, hi)
            flat[pos - lo:upto - lo] = self._blocks(first, last)[pos - first:upto - first]
            pos = upto
        return out

    def _blocks(self, first: int, last: int) -> torch.Tensor:
        """Elements ``first..last`` of the flattened weight (``first`` on a block; ``last`` on one or the end)."""
        import bitsandbytes.functional as bnbf
        size, state = self._state.blocksize, self._state
        piece = bnbf.QuantState(absmax=self._absmax[first // size:-(-last // size)], shape=torch.Size([last - first]),
                                code=state.code, dtype=state.dtype, blocksize=size, quant_type=state.quant_type)
        return bnbf.dequantize_4bit(self._packed[first // 2:(last + 1) // 2], piece).reshape(-1)


def weight_rows(layer: nn.Module) -> Rows4bit | torch.Tensor:
    """The weight of a linear layer to read by rows: a 4-bit one as a :class:`Rows4bit` (no dense copy),
    any other as :func:`dense_weight` gives it (fp32)."""
    return Rows4bit(layer) if bnb_kind(layer) == "Linear4bit" else dense_weight(layer)


@torch.no_grad()
def set_dense_weight(layer: nn.Module, dense: torch.Tensor) -> None:
    """Set the weight of a linear layer from a dense tensor, quantised again if the layer is quantised.

    A 4-bit weight is quantised where it lives, in chunks (:func:`quantize_4bit_chunked`), so the
    quantiser's temporaries stay about 2 MiB next to ``dense`` instead of 2.5 times its size. The
    layer's own ``quant_state`` (bitsandbytes sets it when it quantises) is replaced too: the old
    one would keep the old scales alive and be what a forward on an FSDP-gathered weight reads.
    """
    weight = layer.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        layer.weight = quantize_4bit_chunked(dense, weight)
        if getattr(layer, "quant_state", None) is not None:   # the copy bitsandbytes keeps on the layer (its
            layer.quant_state = layer.weight.quant_state       # FSDP forward reads it): not the stale one
    elif kind == "Int8Params":
        import bitsandbytes as bnb
        fresh = bnb.nn.Int8Params(dense.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        layer.weight = fresh.to(weight.device)
    elif weight.shape == dense.shape:
        # in place: a weight still in the checkpoint's (private, writable) memory map becomes anonymous
        # memory page by page, instead of a second copy of the layer next to the mapped file pages
        weight.data.copy_(dense)
    else:
        weight.data = dense.to(weight.dtype)


NESTED_BLOCKSIZE = 256      # bitsandbytes' block size for the absmax of a compress_statistics weight


@torch.no_grad()
def quantize_4bit_chunked(dense: torch.Tensor, like: nn.Parameter, chunk: int = 2 ** 18) -> nn.Parameter:
    """``dense`` quantised in the format of the 4-bit weight ``like`` (a ``Params4bit``), ``chunk``
    elements at a time; bit for bit what ``bitsandbytes.functional.quantize_4bit`` gives for the whole.

    Blockwise 4-bit quantisation (QLoRA, Dettmers et al. 2023, §2–3) treats the flattened weight as
    blocks of ``blocksize`` elements, each coded by its own absmax; only the last block may be short.
    So every chunk but the last holds whole blocks (``chunk`` rounded down to a multiple of
    ``blocksize``), is quantised alone (``compress_statistics=False``), and its packed codes (two per
    byte: a chunk of an even number of elements fills whole bytes) and absmax are laid end to end.
    Double quantisation (§3 "Double Quantization") is then applied to the whole absmax vector as
    bitsandbytes does: minus its global mean, quantised blockwise in blocks of 256 (the dynamic map).
    Each chunk is cast to the weight's dtype and moved to its device only as it is quantised. The
    default, 2**18 elements (1 MiB in fp32): on a 5632 × 2048 layer on the CPU the call peaks 7 MiB
    above ``dense`` (5.5 of them the new codes), against 111 MiB in one piece, in the same time.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    state = like.quant_state
    blocksize, quant_type = state.blocksize, state.quant_type
    flat = dense.reshape(-1)
    n = flat.numel()
    step = max(blocksize, chunk // blocksize * blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=like.device)
    absmax, code = [], None
    for start in range(0, n, step):
        part = flat[start:start + step].to(like.device, state.dtype)
        codes, part_state = bnbf.quantize_4bit(part, blocksize=blocksize, compress_statistics=False,
                                               quant_type=quant_type, quant_storage=torch.uint8)
        packed[start // 2:start // 2 + codes.numel()] = codes.reshape(-1)
        absmax.append(part_state.absmax)
        code = part_state.code
        del part, codes, part_state
    absmax = torch.cat(absmax)
    offset = state2 = None
    if like.compress_statistics:
        offset = absmax.mean()
        absmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    quant_state = bnbf.QuantState(absmax=absmax, shape=dense.shape, dtype=state.dtype, blocksize=blocksize,
                                  code=code, quant_type=quant_type, offset=offset, state2=state2)
    return bnb.nn.Params4bit(packed.view(like.quant_storage).unsqueeze(1), requires_grad=False,
                             quant_state=quant_state, blocksize=blocksize,
                             compress_statistics=like.compress_statistics, quant_type=quant_type,
                             quant_storage=like.quant_storage, bnb_quantized=True)


class WeightGradients:
    """Accumulate ``∂L/∂W = Σ_tokens g xᵀ`` of linear layers whose weight has no gradient (quantised).

    A forward hook on each layer keeps its input x and puts a gradient hook on its output y, which
    receives g = ∂L/∂y in the backward pass. Where y does not require a gradient (a first layer whose
    input is the embeddings), a zero that does is added to it, so the backward pass reaches it
    without changing any value. With gradient checkpointing a layer's forward runs twice; the input is
    kept per layer and overwritten by the same values.

    Args:
        layers: name → the linear layer (or an adapter layer: its ``base`` is used).
        store: device of the sums (the CPU keeps the accelerator's memory free).
    """

    def __init__(self, layers: dict[str, nn.Module], store: str | torch.device = "cpu") -> None:
        self.layers = {name: getattr(layer, "base", layer) for name, layer in layers.items()}
        self.store = store
        self.sums: dict[str, torch.Tensor] = {}
        self._inputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._zero = torch.zeros((), requires_grad=True)

    def __enter__(self) -> "WeightGradients":
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in self.layers.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            if not torch.is_grad_enabled():
                return None
            self._inputs[name] = args[0].detach()
            if not output.requires_grad:
                output = output + self._zero.to(output.device, output.dtype)
            output.register_hook(lambda g: self._add(name, g))
            return output
        return forward_hook

    def _add(self, name: str, g: torch.Tensor) -> None:
        x = self._inputs[name]
        grad = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        total = self.sums.get(name)
        self.sums[name] = grad.to(self.store) if total is None else total + grad.to(self.store)

