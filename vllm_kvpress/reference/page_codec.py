"""Owns reading and writing compressed pages byte for byte as `layout.py` defines them, in PyTorch.

This is the oracle of the Triton write kernels (triton_kernels/cache_write.py) and the source of
dequantized K/V for the reference attention. The cache is vLLM's tensor for one layer:
uint8 [num_blocks, num_kv_heads, layout.bytes_per_head].

Write semantics (shared with the kernels): a block that becomes complete in a write is encoded
whole (per-channel K, per-token V, GEAR terms) from the exact new tokens plus the dequantized
staged ones; tokens of a block that stays partial are staged (per-token K and V, no GEAR terms).
With `layout.exact_tail_keys` a partial block's keys are kept exact in a tail beside the pages
(`triton_kernels/exact_tail.py`), so the completing encode reads them from there, and its K codes
and meta stay unwritten until then.
"""

from dataclasses import dataclass

import torch

from vllm_kvpress.headwise_layout import head_token_count, logical_block_location
from vllm_kvpress.layout import PageLayout
from vllm_kvpress.mixed_layout import LowPrecisionPacking
from vllm_kvpress.reference.gear import group_zscores, lowrank_factors, lowrank_product, select_outliers
from vllm_kvpress.reference.quant import (
    dequantize_groups,
    dequantize_groups_symmetric,
    pack_codes,
    quantize_groups,
    quantize_groups_symmetric,
    unpack_codes,
)


def _view(page: torch.Tensor, offset: int, dtype: torch.dtype, count: int) -> torch.Tensor:
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    return page[offset : offset + nbytes].view(dtype)


@dataclass(frozen=True)
class TensorRegions:
    """Where one tensor (K or V) of a head's page lives."""

    codes: str
    meta: str
    lowrank: str
    sparse: str
    bits_attr: str


K_REGIONS = TensorRegions("k_codes", "k_meta", "k_lowrank", "k_sparse", "k_bits")
V_REGIONS = TensorRegions("v_codes", "v_meta", "v_lowrank", "v_sparse", "v_bits")


def _to_groups(x: torch.Tensor, is_key: bool, layout: PageLayout) -> torch.Tensor:
    """[tokens, head_size] -> [groups, group_len]: K channels (KIVI) or V token groups."""
    return x.t() if is_key else x.reshape(-1, layout.v_group_size)


def _from_groups(g: torch.Tensor, is_key: bool, tokens: int, layout: PageLayout) -> torch.Tensor:
    return g.t() if is_key else g.reshape(tokens, layout.head_size)


def _codes_region(page: torch.Tensor, is_key: bool, layout: PageLayout) -> torch.Tensor:
    """The packed codes of K ([tokens, channel bytes]) or V ([channels, token bytes])."""
    regions = K_REGIONS if is_key else V_REGIONS
    bits, bs, d = getattr(layout, regions.bits_attr), layout.block_size, layout.head_size
    region = page[layout.offset(regions.codes) : layout.offset(regions.codes) + bs * d * bits // 8]
    return region.view(bs, d * bits // 8) if is_key else region.view(d, bs * bits // 8)


def _load_codes(page: torch.Tensor, is_key: bool, layout: PageLayout) -> torch.Tensor:
    """Codes of a whole block, uint8 [block_size, head_size]."""
    bits = layout.k_bits if is_key else layout.v_bits
    codes = unpack_codes(_codes_region(page, is_key, layout), bits)
    return codes if is_key else codes.t()


def _store_codes(page: torch.Tensor, codes: torch.Tensor, is_key: bool, layout: PageLayout) -> None:
    bits = layout.k_bits if is_key else layout.v_bits
    _codes_region(page, is_key, layout)[:] = pack_codes(codes if is_key else codes.t().contiguous(), bits)


def encode_complete(page: torch.Tensor, x: torch.Tensor, is_key: bool, layout: PageLayout, power_iters: int):
    """Encode a full block of one tensor of one head: x [block_size, head_size] -> page regions."""
    regions = K_REGIONS if is_key else V_REGIONS
    bits, bs, d = getattr(layout, regions.bits_attr), layout.block_size, layout.head_size
    x = x.float()
    groups = _to_groups(x, is_key, layout)
    if layout.num_outliers:
        outliers = select_outliers(_from_groups(group_zscores(groups), is_key, bs, layout), layout.num_outliers)
    else:
        outliers = torch.zeros_like(x, dtype=torch.bool)
    codes, scale, zero = quantize_groups(groups, bits, exclude=_to_groups(outliers, is_key, layout))
    deq = _from_groups(dequantize_groups(codes, scale, zero), is_key, bs, layout)
    codes = _from_groups(codes, is_key, bs, layout)
    _store_codes(page, codes, is_key, layout)
    n_meta = scale.numel()
    _view(page, layout.offset(regions.meta), torch.float16, n_meta)[:] = scale.flatten()
    _view(page, layout.offset(regions.meta) + 2 * n_meta, torch.float16, n_meta)[:] = zero.flatten()
    correction = torch.zeros_like(x)
    if layout.rank:
        residual = torch.where(outliers, 0.0, x - deq)
        a, b = lowrank_factors(residual, layout.rank, power_iters)
        _view(page, layout.offset(regions.lowrank), torch.float16, layout.rank * bs)[:] = a.flatten()
        _view(page, layout.offset(regions.lowrank) + 2 * layout.rank * bs, torch.float16, layout.rank * d)[:] = (
            b.flatten()
        )
        correction = lowrank_product(a, b)
    if layout.num_outliers:
        n = layout.num_outliers
        index = torch.zeros(n, dtype=torch.int16, device=x.device)
        value = torch.zeros(n, dtype=torch.float16, device=x.device)
        flat = outliers.flatten().nonzero().flatten()  # row-major order, as the kernel's prefix sum
        index[: flat.numel()] = flat.to(torch.int16)
        value[: flat.numel()] = (x - deq - correction).flatten()[flat].half()
        _view(page, layout.offset(regions.sparse), torch.int16, n)[:] = index
        _view(page, layout.offset(regions.sparse) + 2 * n, torch.float16, n)[:] = value


def stage_token(page: torch.Tensor, offset: int, k: torch.Tensor | None, v: torch.Tensor, layout: PageLayout):
    """Write one token of a partial block: K symmetric per channel group (None: the key is kept in
    an exact tail instead), V asymmetric per group."""
    bs, kg = layout.block_size, layout.k_stage_groups
    if k is not None:
        kc, ks = quantize_groups_symmetric(k.float().reshape(kg, -1), layout.k_bits)
        _codes_region(page, True, layout)[offset] = pack_codes(kc.flatten(), layout.k_bits)
        _view(page, layout.offset("k_meta"), torch.float16, bs * kg)[offset * kg : (offset + 1) * kg] = ks
    vc, vs, vz = quantize_groups(v.float().reshape(-1, layout.v_group_size), layout.v_bits)
    codes = _load_codes(page, False, layout)  # V bytes are shared by neighbouring tokens
    codes[offset] = vc.flatten()
    _store_codes(page, codes, False, layout)
    g = layout.v_groups
    _view(page, layout.offset("v_meta"), torch.float16, bs * g)[offset * g : (offset + 1) * g] = vs
    _view(page, layout.offset("v_meta") + 2 * bs * g, torch.float16, bs * g)[offset * g : (offset + 1) * g] = vz


def _decode_tensor(page: torch.Tensor, is_key: bool, layout: PageLayout, complete: bool) -> torch.Tensor:
    regions = K_REGIONS if is_key else V_REGIONS
    bits, bs, d = getattr(layout, regions.bits_attr), layout.block_size, layout.head_size
    codes = _load_codes(page, is_key, layout)
    meta = layout.offset(regions.meta)
    if is_key and not complete:  # staging: symmetric scales per token and channel group
        kg = layout.k_stage_groups
        scale = _view(page, meta, torch.float16, bs * kg).reshape(bs, kg)
        return dequantize_groups_symmetric(codes.reshape(bs, kg, -1), scale, bits).reshape(bs, d)
    groups = _to_groups(codes, is_key, layout)
    n_meta = groups.shape[0]
    scale, zero = _view(page, meta, torch.float16, n_meta), _view(page, meta + 2 * n_meta, torch.float16, n_meta)
    x = _from_groups(dequantize_groups(groups, scale, zero), is_key, bs, layout)
    if complete and layout.rank:
        lr = layout.offset(regions.lowrank)
        a = _view(page, lr, torch.float16, layout.rank * bs).reshape(layout.rank, bs)
        b = _view(page, lr + 2 * layout.rank * bs, torch.float16, layout.rank * d).reshape(layout.rank, d)
        x = x + lowrank_product(a, b)
    if complete and layout.num_outliers:
        n = layout.num_outliers
        index = _view(page, layout.offset(regions.sparse), torch.int16, n).long()
        value = _view(page, layout.offset(regions.sparse) + 2 * n, torch.float16, n).float()
        x = x.flatten().index_add(0, index, value).reshape(bs, d)
    return x


def decode_block(page: torch.Tensor, layout: PageLayout, complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized (K, V) of one head's page, fp32 [block_size, head_size] each."""
    return _decode_tensor(page, True, layout, complete), _decode_tensor(page, False, layout, complete)


def write_tokens(
    cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: PageLayout,
    power_iters: int,
    tail: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Reference of the cache update: key/value [num_tokens, num_kv_heads, head_size], slots < 0 skipped.

    Args:
        tail: with `layout.exact_tail_keys`: (exact tail [slots, num_kv_heads, block_size, head_size],
            int [num_tokens] each token's request-state slot), as the write kernels take them.
    """
    if layout.exact_tail_keys != (tail is not None):
        raise ValueError(f"a layout with exact_tail_keys={layout.exact_tail_keys} needs a tail exactly when set")
    bs = layout.block_size
    by_block: dict[int, list[tuple[int, int]]] = {}
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            by_block.setdefault(slot // bs, []).append((t, slot % bs))
    completing = {b: toks for b, toks in by_block.items() if any(off == bs - 1 for _, off in toks)}
    # completed blocks first: their older keys sit in the tail that a new partial block overwrites
    for block, tokens in completing.items():
        for h in range(cache.shape[1]):
            page = cache[block, h]
            v_full = _decode_tensor(page, False, layout, complete=False)
            if tail is not None:  # the older keys were never staged in the page
                k_full = tail[0][int(tail[1][tokens[-1][0]]), h].float().clone()
            else:
                k_full = _decode_tensor(page, True, layout, complete=False)
            for t, off in tokens:
                k_full[off], v_full[off] = key[t, h].float(), value[t, h].float()
            encode_complete(page, k_full, True, layout, power_iters)
            encode_complete(page, v_full, False, layout, power_iters)
    for block, tokens in by_block.items():
        if block in completing:
            continue
        for h in range(cache.shape[1]):
            for t, off in tokens:
                if tail is not None:
                    tail[0][int(tail[1][t]), h, off] = key[t, h].to(tail[0].dtype)
                stage_token(cache[block, h], off, None if tail is not None else key[t, h], value[t, h], layout)


def read_sequence(
    cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int, layout: PageLayout,
    tail_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K, V of one sequence: fp32 [seq_len, num_kv_heads, head_size] each.

    Args:
        tail_keys: with `layout.exact_tail_keys`: the sequence's exact tail [num_kv_heads,
            block_size, head_size], where a partial last block's keys are.
    """
    if layout.exact_tail_keys and tail_keys is None and seq_len % layout.block_size:
        raise ValueError("a partial block under exact_tail_keys is read from the sequence's tail_keys")
    bs = layout.block_size
    ks, vs = [], []
    for i in range(-(-seq_len // bs)):
        n = min(bs, seq_len - i * bs)
        per_head = [decode_block(cache[int(block_table_row[i]), h], layout, n == bs) for h in range(cache.shape[1])]
        k_block = torch.stack([k[:n] for k, _ in per_head], 1)
        if n < bs and layout.exact_tail_keys:
            k_block = tail_keys[:, :n].transpose(0, 1).float()
        ks.append(k_block)
        vs.append(torch.stack([v[:n] for _, v in per_head], 1))
    return torch.cat(ks), torch.cat(vs)


def read_head_sequence(cache: torch.Tensor, view_row: torch.Tensor, head: int, retrieval_index: int,
                       seq_len: int, layout: PageLayout, *, kept: int, chunks: int, middle: int,
                       retrieval_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K, V [tokens, head_size] of one KV head of a head-wise packed request
    (vllm_kvpress/headwise_layout.py): its logical blocks, each read from the (view block, head slot) where
    the packing put it; the last block is partial when the head's token count ends inside it."""
    bs = layout.block_size
    tokens = head_token_count(seq_len, retrieval_index, chunks=chunks, middle=middle, block_size=bs)
    ks, vs = [], []
    for j in range(-(-tokens // bs)):
        block, slot = logical_block_location(j, head, retrieval_index, kept=kept, chunks=chunks, middle=middle,
                                             retrieval_heads=retrieval_heads, kv_heads=cache.shape[1])
        n = min(bs, tokens - j * bs)
        k, v = decode_block(cache[int(view_row[block]), slot], layout, n == bs)
        ks.append(k[:n])
        vs.append(v[:n])
    return torch.cat(ks), torch.cat(vs)


def write_low_chunks(cache: torch.Tensor, block_ids: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     low_layout: PageLayout, packing: LowPrecisionPacking, power_iters: int) -> int:
    """Write key/value [n * block_size, num_kv_heads, head_size] (chunk c: tokens [c * block_size,
    (c + 1) * block_size) of every KV head) as low-precision units packed into the blocks
    `block_ids` (physical ids in view order; unit c * H + h holds chunk c of head h); returns the
    blocks used, L = `packing.middle_blocks(n, 0)`.

    Each chunk is encoded as one complete page of `low_layout`, byte for byte what the write
    kernels store in a block of that layout."""
    bs = low_layout.block_size
    num_chunks = key.shape[0] // bs
    if num_chunks * bs != key.shape[0]:
        raise ValueError(f"low-precision chunks are whole blocks: got {key.shape[0]} tokens for block_size {bs}")
    chunks = torch.zeros(num_chunks, packing.kv_heads, packing.unit_bytes, dtype=torch.uint8, device=cache.device)
    write_tokens(chunks, key, value, torch.arange(num_chunks * bs, device=cache.device), low_layout, power_iters)
    packing.scatter_units(cache, block_ids, chunks)
    return packing.middle_blocks(num_chunks, 0)


def read_low_chunks(cache: torch.Tensor, block_ids: torch.Tensor, num_chunks: int, low_layout: PageLayout,
                    packing: LowPrecisionPacking) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K, V fp32 [num_chunks * block_size, num_kv_heads, head_size] of the units
    `write_low_chunks` packed into `block_ids`."""
    chunks = packing.gather_units(cache, block_ids, num_chunks)
    return read_sequence(chunks, torch.arange(num_chunks, device=cache.device), num_chunks * low_layout.block_size,
                         low_layout)
