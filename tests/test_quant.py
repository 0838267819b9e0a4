"""Re-quantising a 4-bit weight in chunks (``lorafit.quant.quantize_4bit_chunked``, what an init that
rewrites W0 does on an nf4/fp4 base) against bitsandbytes' own whole-tensor ``quantize_4bit``: the
packed codes, the absmax, the nested statistics and the dequantised weight are bit-identical."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

from lorafit import linalg  # noqa: E402
from lorafit.linalg import singular_triplets  # noqa: E402
from lorafit.quant import (Rows4bit, dense_weight, quantize_4bit_chunked, set_dense_weight,  # noqa: E402
                           weight_rows)


def weight(shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded values whose scale varies by a factor 100 across rows, so the blocks' absmax (and the
    chunks' means of them) differ: a per-chunk offset or a block cut in two changes the result."""
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    scale = torch.logspace(-2, 0, shape[0]).unsqueeze(1)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def quantised_like(shape: tuple[int, int], quant_type: str, nested: bool, blocksize: int,
                   dtype: torch.dtype, storage: torch.dtype) -> bnb.nn.Params4bit:
    """A layer's 4-bit weight as bitsandbytes makes it (quantised on moving to the device)."""
    return bnb.nn.Params4bit(weight((shape[1], shape[0]), dtype).T.contiguous(), requires_grad=False,
                             quant_type=quant_type, blocksize=blocksize, compress_statistics=nested,
                             quant_storage=storage).to("cpu")


def assert_bit_identical(ours: bnb.nn.Params4bit, dense: torch.Tensor, like: bnb.nn.Params4bit) -> None:
    codes, ref = bnbf.quantize_4bit(dense.to(like.quant_state.dtype), blocksize=like.blocksize,
                                    compress_statistics=like.compress_statistics, quant_type=like.quant_type,
                                    quant_storage=like.quant_storage)
    state = ours.quant_state
    assert ours.bnb_quantized and not ours.requires_grad
    assert ours.dtype == codes.dtype and ours.shape == codes.shape
    assert torch.equal(ours.data.view(torch.uint8), codes.view(torch.uint8))    # bytes: bf16 words may be NaNs
    assert (ours.quant_type, ours.blocksize, ours.compress_statistics, ours.quant_storage) == \
        (like.quant_type, like.blocksize, like.compress_statistics, like.quant_storage)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type, state.nested) == \
        (ref.shape, ref.dtype, ref.blocksize, ref.quant_type, ref.nested)
    assert torch.equal(state.code, ref.code)
    assert state.absmax.dtype == ref.absmax.dtype and torch.equal(state.absmax, ref.absmax)
    if ref.nested:
        assert torch.equal(state.offset, ref.offset)
        assert state.state2.blocksize == ref.state2.blocksize
        assert torch.equal(state.state2.absmax, ref.state2.absmax) and torch.equal(state.state2.code, ref.state2.code)
    else:
        assert state.offset is None and state.state2 is None
    assert torch.equal(bnbf.dequantize_4bit(ours.data, state), bnbf.dequantize_4bit(codes, ref))


CASES = {
    # (out, in), blocksize, chunk (elements), dtype, quant_storage
    # 120 blocks of 64 and a chunk of 300 elements: rounded down to 256 = 4 blocks, 30 chunks. Catches
    # a chunk cut at 300 (blocks straddling chunks: their absmax and codes change).
    "several_chunks": ((80, 96), 64, 300, torch.float32, torch.uint8),
    # 40 960 elements, 640 absmax: the nested step has 3 blocks of 256 (the last short), 10 chunks
    # of 4096. Catches the nested step done per chunk (10 offsets, 10 short nested blocks).
    "nested_blocks": ((160, 256), 64, 4096, torch.float32, torch.uint8),
    # 61 × 41 = 2501 elements: odd (the last byte holds one code), the last block of 128 is 69
    # elements, rows do not hold whole blocks, and 2501 is not a multiple of the 512-element chunk.
    # Catches a chunk rounded to rows, a padded or dropped tail, a last chunk's bytes misplaced.
    "not_aligned": ((61, 41), 128, 512, torch.float32, torch.uint8),
    # the weight kept in bf16 and stored as bf16 words (as FSDP needs): each chunk is cast, and the
    # packed bytes are viewed as bf16 only once whole. Catches a missing cast (fp32 absmax differ).
    "bf16": ((64, 96), 64, 1000, torch.bfloat16, torch.bfloat16),
}


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "compress_statistics"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_quantisation_is_bitsandbytes_whole_tensor_quantisation(case: str, quant_type: str,
                                                                         nested: bool) -> None:
    # compress_statistics: catches no offset, a per-chunk offset instead of the global mean, the
    # nested absmax quantised with the 4-bit blocksize instead of 256, the offset not subtracted.
    shape, blocksize, chunk, dtype, storage = CASES[case]
    like = quantised_like(shape, quant_type, nested, blocksize, dtype, storage)
    dense = weight(shape) * 0.5 + 0.01           # the "residual": fp32, as an init forms it
    assert dense.numel() > chunk                 # really split
    assert_bit_identical(quantize_4bit_chunked(dense, like, chunk=chunk), dense, like)


def test_one_chunk_is_the_whole_tensor() -> None:
    """The default chunk (2**18 elements) on a small layer: one call, the same result."""
    like = quantised_like((40, 64), "nf4", True, 64, torch.float32, torch.uint8)
    dense = weight((40, 64)) - 0.02
    assert_bit_identical(quantize_4bit_chunked(dense, like), dense, like)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "compress_statistics"])
def test_set_dense_weight_requantises_a_linear4bit_layer(nested: bool) -> None:
    """Through a bitsandbytes ``Linear4bit``: the new weight reads back as bitsandbytes' own
    quantisation of the dense tensor would, and the layer computes with it (a stale quant_state,
    or the old weight kept, would give the old weight's output). The layer's own ``quant_state``
    (set by bitsandbytes when it quantised; read by its forward on an FSDP-gathered weight) is the
    new one: catches the old one left there (stale scales, kept alive)."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(96, 48, bias=False, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight((48, 96)), requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested, module=layer).to("cpu")
    assert layer.quant_state is layer.weight.quant_state
    dense = dense_weight(layer) * -2.0
    codes, ref = bnbf.quantize_4bit(dense, compress_statistics=nested, quant_type="nf4")
    set_dense_weight(layer, dense)
    expected = bnbf.dequantize_4bit(codes, ref)
    assert torch.equal(dense_weight(layer), expected) and layer.quant_state is layer.weight.quant_state
    x = torch.randn(3, 96)
    assert torch.allclose(layer.train()(x), x @ expected.T, atol=1e-5)


ROW_CASES = {
    # (out, in), blocksize, dtype (quant_storage: uint8, or bf16 with bf16)
    # tall; 61 × 41 = 2501 elements: odd (the last byte holds one code), no row holds whole blocks
    # of 64, the last block is short (5 elements). Catches a row range cut at the block edge instead
    # of dequantising the blocks that cover it, bytes taken from element/1 instead of element/2, the
    # short last block dropped or padded.
    "tall": ((61, 41), 64, torch.float32),
    # wide; 40 × 200: rows straddle blocks of 64 at varying offsets, 125 blocks.
    "wide": ((40, 200), 64, torch.float32),
    # kept in bf16, stored as bf16 words (FSDP's layout): catches the packed words read as elements
    # rather than viewed as bytes, and a piece not cast as the whole is (quant_state.dtype bf16).
    # (in_features a multiple of the blocksize: bitsandbytes 0.50.2's CPU kernel dequantises a whole
    # 48 × 96 weight wrongly — rows of 96 with blocks of 64 — where its pure-PyTorch path and the
    # row reader, whose pieces are one flat row, agree.)
    "bf16": ((48, 128), 64, torch.bfloat16),
}


def linear4bit(shape: tuple[int, int], quant_type: str, nested: bool, blocksize: int,
               dtype: torch.dtype) -> torch.nn.Module:
    storage = torch.bfloat16 if dtype == torch.bfloat16 else torch.uint8
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=dtype, compress_statistics=nested,
                              quant_type=quant_type, quant_storage=storage)
    layer.weight = bnb.nn.Params4bit(weight(shape, dtype), requires_grad=False, quant_type=quant_type,
                                     blocksize=blocksize, compress_statistics=nested, quant_storage=storage,
                                     module=layer).to("cpu")
    return layer


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "compress_statistics"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("case", list(ROW_CASES))
def test_rows_of_a_4bit_weight_are_its_whole_dequantisation(case: str, quant_type: str, nested: bool) -> None:
    """Row blocks of 1, 7 and all rows, each dequantised in pieces of 2 blocks (chunk=128), laid end
    to end: bit for bit bitsandbytes' dequantize_4bit of the whole weight, in fp32. compress_statistics
    catches the compressed (uint8) absmax used as scales, the offset not added, or the nested absmax
    decompressed per piece (its blocks of 256 cut)."""
    shape, blocksize, dtype = ROW_CASES[case]
    layer = linear4bit(shape, quant_type, nested, blocksize, dtype)
    whole = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    rows = Rows4bit(layer, chunk=128)
    assert rows.shape == whole.shape and rows.dtype == torch.float32
    for step in (1, 7, shape[0]):
        got = torch.cat([rows.rows(i, i + step) for i in range(0, shape[0], step)])
        assert torch.equal(got, whole), step
    assert torch.equal(weight_rows(layer).rows(3, 11), whole[3:11])     # the default chunk


@pytest.mark.parametrize("minor", [False, True], ids=["top", "bottom"])
@pytest.mark.parametrize("shape", [(96, 40), (40, 200)], ids=["tall", "wide"])
def test_triplets_read_by_rows_are_those_of_the_dense_weight(shape: tuple[int, int], minor: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """singular_triplets of an nf4 layer read by rows = of its dequantised weight, to fp32 rounding and
    with the same signs (both take them from the Gram matrix's eigenvectors). Chunks of 256 elements
    (rows of 2-6) and 8 row blocks of 5 for the wide W Wᵀ: catches a lower-triangle block not mirrored
    (or mirrored untransposed), a block skipped, a short last block or chunk dropped, Wᵀ U summed
    against the wrong rows of U, U and V swapped for a wide reader."""
    monkeypatch.setattr(linalg, "CHUNK_ELEMENTS", 256)
    layer = linear4bit(shape, "nf4", True, 64, torch.float32)
    rows, dense = weight_rows(layer), dense_weight(layer)
    assert isinstance(rows, Rows4bit)
    got, ref = singular_triplets(rows, 5, minor), singular_triplets(dense, 5, minor)
    for ours, theirs in zip(got, ref):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.allclose(got[1], ref[1], rtol=1e-6, atol=0)
    assert (got[0] - ref[0]).abs().max() < 1e-5 and (got[2] - ref[2]).abs().max() < 1e-5


def test_spectral_and_milora_read_a_4bit_base_by_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spectral's attach never dequantises more than a piece of a 4-bit base, and MiLoRA's init hands
    singular_triplets a Rows4bit (its rebase then dequantises the whole, for the residual); a plain
    base is still read as its fp32 weight. Catches either still calling dense_weight for the SVD."""
    from lorafit.adapters.lora import LoRALinear
    from lorafit.adapters.spectral import SpectralLinear
    from lorafit.inits import svd

    monkeypatch.setattr(linalg, "CHUNK_ELEMENTS", 256)     # so a small layer is read in pieces too
    sizes, read = [], []
    dequantize = bnbf.dequantize_4bit

    def recorded(*args, **kwargs) -> torch.Tensor:
        out = dequantize(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(bnbf, "dequantize_4bit", recorded)
    monkeypatch.setattr(svd, "singular_triplets", lambda W, r, minor: read.append(W) or singular_triplets(W, r, minor))
    SpectralLinear(linear4bit((40, 200), "nf4", False, 64, torch.float32), 4)
    assert sizes and max(sizes) < 40 * 200
    svd.MiLoRAInit().apply({"layer": LoRALinear(linear4bit((40, 200), "nf4", False, 64, torch.float32), 4, 1.0)})
    assert len(read) == 1 and isinstance(read[0], Rows4bit)
    plain = torch.nn.Linear(30, 20)
    assert torch.equal(weight_rows(plain), plain.weight)
