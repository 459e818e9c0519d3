"""Owns the KV-head merge of "Effectively Compress KV Heads for LLM" (arXiv 2406.07056): a GQA or
MHA checkpoint becomes one with `g` times fewer KV heads, each new head standing for `g` adjacent
old ones, from the low-rank structure of their KV cache on calibration text.

Values. The g heads' values of a token, concatenated (g * D numbers), lie close to a D-dimensional
subspace: its basis Psi (g * D x D, orthonormal columns) is the top eigenvectors of their Gram
matrix over the calibration tokens. The new head stores V' = V_cat Psi; old head j's value is read
back as V' Psi_j^T (Psi_j: head j's D rows of Psi). Both maps fold into weights: W_v' = Psi^T W_v,
and each query head of old group j gets its block of W_o multiplied by Psi_j. Nothing is added to
the model at run time; the checkpoint is an ordinary GQA one.

Keys, RoPE-aware. A linear map on keys survives RoPE only if it commutes with the rotations, and
RoPE rotates channel pair (m, m + D/2) of every head by the same angle theta_m * position. Writing
pair m of head j as a complex number z_j, the maps that commute are complex multiplications per
pair. So, per pair m, the g heads' complex keys (a vector in C^g) are approximated by rank one,
z_j ~ kappa * conj(w_j) with w the top eigenvector of their Hermitian Gram matrix (unit norm) and
kappa = sum_j w_j z_j the new head's key; a query of old group j then scores kappa through q * w_j,
because Re(q e^{i theta t} conj(z_j e^{i theta s})) = Re(q w_j e^{i theta t} conj(kappa e^{i theta s})).
Both are 2 x 2 rotation-scalings of the pair's rows of W_k (summed over the group) and of W_q, exact
at every position. This is our equivalent of the paper's RoPE treatment: the best key subspace among
those RoPE leaves intact, fitted on the cache as the paper fits values.

`mean` is the baseline the paper improves on (GQA's mean-pooling of K and V heads, queries and
output projection unchanged).

Keys and values may be merged to different head counts (Sigma's DiffQKV, arXiv 2501.13629: fewer K
heads than V heads): `merge_layer` takes a value merge of its own, and the checkpoint gets the larger
count, the fewer heads' projections repeated so that every query head meets its own merged K and V.
"""

from dataclasses import dataclass

import torch


@dataclass
class GroupStatistics:
    """Second moments of one layer's calibration keys and values, per new KV head.

    key_gram: complex [new_heads, D/2, g, g], per RoPE pair the Gram matrix of the group's complex
    keys (sum over tokens of conj(z)^T z). value_gram: [new_heads, g * D, g * D]."""

    key_gram: torch.Tensor
    value_gram: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, new_heads: int, group: int, head_size: int) -> "GroupStatistics":
        return cls(torch.zeros(new_heads, head_size // 2, group, group, dtype=torch.complex128),
                   torch.zeros(new_heads, group * head_size, group * head_size, dtype=torch.float64))

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: [T, old_heads, D] before RoPE (the k_proj / v_proj outputs)."""
        new_heads, half = self.key_gram.shape[:2]
        tokens, old_heads, head_size = keys.shape
        group = old_heads // new_heads
        z = torch.complex(keys[..., :half].double(), keys[..., half:].double())  # [T, old, D/2]
        z = z.reshape(tokens, new_heads, group, half).permute(1, 3, 0, 2)  # [new, D/2, T, g]
        self.key_gram += z.conj().transpose(-1, -2) @ z
        v = values.double().reshape(tokens, new_heads, group * head_size).transpose(0, 1)  # [new, T, g*D]
        self.value_gram += v.transpose(-1, -2) @ v
        self.tokens += tokens


@dataclass(frozen=True)
class HeadMerge:
    """One layer's merge, per new head h, old head j of its group and RoPE pair m:

    key_weights complex [new_heads, D/2, g]: the new key is kappa = sum_j key_weights z_j.
    query_weights complex [new_heads, D/2, g]: old group j's queries are multiplied by them, and old
        head j's key is read back as kappa * conj(query_weights).
    value_encoder [new_heads, g * D, D]: the new value is the group's concatenated values times it.
    value_decoder [new_heads, g, D, D]: old head j's value is read back as the new value times its
        transpose (folded into the output projection)."""

    key_weights: torch.Tensor
    query_weights: torch.Tensor
    value_encoder: torch.Tensor
    value_decoder: torch.Tensor

    @classmethod
    def fit(cls, stats: GroupStatistics) -> "HeadMerge":
        """The paper's merge: the top eigenvectors of the calibration Gram matrices."""
        new_heads, _, group, _ = stats.key_gram.shape
        head_size = stats.value_gram.shape[-1] // group
        _, key_vectors = torch.linalg.eigh(stats.key_gram)  # ascending eigenvalues
        _, value_vectors = torch.linalg.eigh(stats.value_gram)
        # z ~ kappa conj(w) with kappa = sum_j w_j z_j: w, the eigenvector, both writes and reads
        w = key_vectors[..., -1]
        psi = value_vectors[..., -head_size:].flip(-1)
        return cls(w, w, psi, psi.reshape(new_heads, group, head_size, head_size))

    @classmethod
    def mean(cls, new_heads: int, group: int, head_size: int) -> "HeadMerge":
        """GQA's mean-pooling as a merge: every old head weighs 1/g on the new one's K and V, and
        the mean is read back as every old head's key and value (queries and output unchanged)."""
        key_weights = torch.full((new_heads, head_size // 2, group), 1 / group, dtype=torch.complex128)
        eye = torch.eye(head_size, dtype=torch.float64)
        return cls(key_weights, torch.ones_like(key_weights),
                   (eye.repeat(group, 1) / group).expand(new_heads, -1, -1),
                   eye.expand(new_heads, group, head_size, head_size))


def rotate_pairs(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply every RoPE pair of `rows` by a complex weight.

    rows: [..., D, X] (weight rows of one head's projection, or its bias with X = 1), pair m is rows
    m and m + D/2; weights: complex [..., D/2]. Returns the rows of the projection whose output is
    the input projection's pairs times the weights."""
    half = rows.shape[-2] // 2
    re, im = weights.real[..., None], weights.imag[..., None]
    first, second = rows[..., :half, :], rows[..., half:, :]
    return torch.cat([re * first - im * second, re * second + im * first], dim=-2)


def merge_layer(attention, merge: HeadMerge, num_heads: int, value_merge: HeadMerge | None = None) -> int:
    """Rewrite one attention layer's q/k/v/o projections in place (fp64 math, the weights' dtype
    kept) so that it has `merge`'s new KV head count, or with a `value_merge` of another count, keys
    from `merge` and values from `value_merge`, at the larger of the two counts (the other's heads
    repeated). Query heads stay contiguous per KV head, so old group j's queries are now in new head
    j // g's group. Returns the layer's new KV head count."""
    value_merge = merge if value_merge is None else value_merge
    new_heads, half, group = merge.key_weights.shape
    value_heads = value_merge.value_encoder.shape[0]
    out_heads = max(new_heads, value_heads)
    head_size = 2 * half
    old_heads = new_heads * group
    queries_per_old = num_heads // old_heads

    def rows(linear, heads):
        weight = linear.weight.double().reshape(heads, head_size, -1)
        bias = None if linear.bias is None else linear.bias.double().reshape(heads, head_size, 1)
        return weight, bias

    def store(linear, weight, bias):
        dtype = linear.weight.dtype
        linear.weight = torch.nn.Parameter(weight.reshape(-1, weight.shape[-1]).to(dtype), requires_grad=False)
        if bias is not None:
            linear.bias = torch.nn.Parameter(bias.reshape(-1).to(dtype), requires_grad=False)
        linear.out_features = linear.weight.shape[0]

    # keys: kappa = sum_j w_j z_j per pair
    k_weight, k_bias = rows(attention.k_proj, old_heads)
    w = merge.key_weights.transpose(1, 2)  # [new, g, D/2]
    k_new = rotate_pairs(k_weight.reshape(new_heads, group, head_size, -1), w).sum(1)
    kb_new = None if k_bias is None else rotate_pairs(k_bias.reshape(new_heads, group, head_size, 1), w).sum(1)
    repeat = out_heads // new_heads
    store(attention.k_proj, k_new.repeat_interleave(repeat, 0),
          None if kb_new is None else kb_new.repeat_interleave(repeat, 0))

    # queries of old group j: q * query_weights_j per pair
    q_weight, q_bias = rows(attention.q_proj, num_heads)
    per_query = merge.query_weights.transpose(1, 2).reshape(old_heads, half).repeat_interleave(queries_per_old, 0)
    store(attention.q_proj, rotate_pairs(q_weight, per_query),
          None if q_bias is None else rotate_pairs(q_bias, per_query))

    # values: the group's concatenated rows times the encoder, per new head
    v_weight, v_bias = rows(attention.v_proj, old_heads)
    value_group = old_heads // value_heads
    encoder_t = value_merge.value_encoder.transpose(-1, -2)  # [new, D, g*D]
    v_new = encoder_t @ v_weight.reshape(value_heads, value_group * head_size, -1)
    vb_new = None if v_bias is None else encoder_t @ v_bias.reshape(value_heads, value_group * head_size, 1)
    repeat = out_heads // value_heads
    store(attention.v_proj, v_new.repeat_interleave(repeat, 0),
          None if vb_new is None else vb_new.repeat_interleave(repeat, 0))

    # output: each query head's D columns of W_o times its old head's decoder
    o = attention.o_proj.weight.double()  # [hidden, num_heads * D]
    blocks = o.reshape(o.shape[0], num_heads, head_size).permute(1, 0, 2)  # [num_heads, hidden, D]
    decoder = value_merge.value_decoder.reshape(old_heads, head_size, head_size)
    blocks = blocks @ decoder.repeat_interleave(queries_per_old, dim=0)
    attention.o_proj.weight = torch.nn.Parameter(
        blocks.permute(1, 0, 2).reshape(o.shape[0], -1).to(attention.o_proj.weight.dtype), requires_grad=False)
    return out_heads
