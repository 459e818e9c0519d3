// Split-KV decode attention over compressed pages, with the codes fed to the tensor cores as they
// are loaded: one warp owns one 64-token block at a time, each thread loads exactly the packed
// words of its mma fragments (the pairing of codes inside a fragment register is chosen to match
// the page's packing, and the query / probability operands are permuted to match), and nothing is
// dequantized element by element.
//
// Compiled by NVRTC (vllm_kvpress/cuda_decode.py), one build per page layout and GQA group, with the
// layout's numbers passed as -D defines from vllm_kvpress/layout.py (never recomputed here). The
// math is the Triton kernel's (triton_kernels/decode_attention.py):
//   complete block:  K = code * s_c + z_c per channel, so  q.k = (q * s).code + q.z
//                    V = code * s_t + z_t per token,   so  p.V = (p * s_t).code + p.z
//   partial block:   K = (code - qmax / 2) * s_tg per token and channel group ("staging"), or with
//                    EXACT_TAIL the keys themselves from the request's exact tail (triton_kernels/exact_tail.py)
//   GEAR:            + a b^T (rank 1) and sparse outliers, on complete blocks only
// A code c becomes the fp16 value 2^(10-e) + c by AND-ing its field (at bit e of a 16-bit half)
// and OR-ing in the exponent of 2^(10-e): one logic op per two codes, no shifts for the fields
// that sit inside the fp16 mantissa. The 2^(10-e) terms, q.z, p.z and the low-rank products are
// extra mma tiles whose A rows are constants or metadata, so they land in the accumulator layout.
// Outputs (unnormalized accumulator, base-2 max, sum) use the Triton kernel's split format, and
// its reduce kernel merges the splits.

#ifndef HEAD_SIZE  // defaults for an offline build (nvcc -arch=sm_90 -cubin); NVRTC passes them all
#define HEAD_SIZE 128
#define BLOCK_SIZE 64
#define K_BITS 4
#define V_BITS 4
#define V_GROUP 128
#define K_STAGE_GROUP 32
#define RANK 1
#define NUM_OUTLIERS 16
#define EXACT_TAIL 0
#define GROUP 4
#define NUM_WARPS 4
#define MIN_CTAS 2
#define Q_BF16 1
#define K_CODES_OFF 0
#define V_CODES_OFF 4096
#define K_META_OFF 8192
#define V_META_OFF 8704
#define K_LOWRANK_OFF 8960
#define V_LOWRANK_OFF 9344
#define K_SPARSE_OFF 9728
#define V_SPARSE_OFF 9792
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

constexpr int BITS = K_BITS;
constexpr int CPW = 32 / BITS;                  // codes per 32-bit word
constexpr int HALF = CPW / 2;                   // a fragment register pairs codes j and j + HALF of a word
constexpr u32 FIELD = (1u << BITS) - 1;
constexpr int FIT = 10 / BITS;                  // fields that sit inside the fp16 mantissa of a half
constexpr int QMAX = (1 << BITS) - 1;
constexpr int N8 = 8;                           // mma N: the GQA group's query heads, padded
constexpr int KROW = HEAD_SIZE * BITS / 8;      // bytes of one token's K codes
constexpr int VROW = BLOCK_SIZE * BITS / 8;     // bytes of one channel's V codes
constexpr int CH_T = HEAD_SIZE / 4;             // channels per thread in the K operand
constexpr int TOK_T = BLOCK_SIZE / 4;           // tokens per thread in the V operand
constexpr int KW = CH_T / CPW;                  // words per K row and thread
constexpr int VW = TOK_T / CPW;                 // words per V row and thread
constexpr int KP = CH_T / 2;                    // fragment registers per K row and thread
constexpr int VP = TOK_T / 2;
constexpr int KT = HEAD_SIZE / 16;              // scores: k-tiles over channels
constexpr int MT = BLOCK_SIZE / 16;             //         m-tiles over tokens
constexpr int VKT = BLOCK_SIZE / 16;            // output: k-tiles over tokens
constexpr int VMT = HEAD_SIZE / 16;             //         m-tiles over channels
constexpr int V_GROUPS = HEAD_SIZE / V_GROUP;
constexpr int STAGE_GROUPS = HEAD_SIZE / K_STAGE_GROUP;
constexpr u32 FP16_ONE = 0x3C00u;
constexpr u32 FP16_SIGN = 0x80008000u;

static_assert(K_BITS == V_BITS && (BITS == 2 || BITS == 4), "K and V codes of 2 or 4 bits, both the same");
static_assert((BLOCK_SIZE * HEAD_SIZE & (BLOCK_SIZE * HEAD_SIZE - 1)) == 0, "outlier indices are masked to the block");
static_assert(KP == 2 * KT && VP == 2 * VKT, "fragment registers must tile the operands");
static_assert(KW >= 1 && KW <= 4 && VW >= 1 && VW <= 4, "a thread's share of a row is 4 to 16 bytes");
static_assert(HALF <= 2 * FIT, "fields above the mantissa need one shift at most");
static_assert(V_GROUP % 16 == 0, "an output m-tile lies in one V group");
static_assert(K_STAGE_GROUP % CPW == 0, "a word's codes lie in one staging group");
static_assert(GROUP >= 1 && GROUP <= N8, "at most 8 query heads per KV head");
static_assert(RANK == 0 || RANK == 1, "GEAR rank 0 or 1");
static_assert(2 * BLOCK_SIZE / 16 <= 16 && 2 * HEAD_SIZE / 16 <= 16, "one-hot rows of a thread fit 16 bits");

// ---- small helpers ------------------------------------------------------------------------------

template <int N> struct alignas(4 * N) Words { u32 w[N]; };

template <int N>
__device__ __forceinline__ void load_words(const u8* p, u32* out) {
    Words<N> v = *reinterpret_cast<const Words<N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = v.w[i];
}

// n words from p (16-byte aligned when n >= 4), in loads of up to 16 bytes
template <int N>
__device__ __forceinline__ void load_span(const u8* p, u32* out) {
    constexpr int STEP = N >= 4 ? 4 : N;
#pragma unroll
    for (int i = 0; i < N; i += STEP) load_words<STEP>(p + 4 * i, out + i);
}

__device__ __forceinline__ float lo_f16(u32 w) {
    float f;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, l;}" : "=f"(f) : "r"(w));
    return f;
}
__device__ __forceinline__ float hi_f16(u32 w) {
    float f;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; cvt.f32.f16 %0, h;}" : "=f"(f) : "r"(w));
    return f;
}
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
__device__ __forceinline__ u32 mul_f16x2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// d += a b: m16n8k16, fp16 operands, fp32 accumulator. Fragments (lane = 4 r + c):
// a0 (row r, k 2c..2c+1) a1 (row r+8, same k) a2 (row r, k 2c+8..) a3 (row r+8, k 2c+8..);
// b0 (k 2c..2c+1, col r) b1 (k 2c+8.., col r); d0 d1 (row r, cols 2c, 2c+1) d2 d3 (row r+8, same cols).
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Fragment register p of a thread's row share holds codes (j, j + HALF) of word p / HALF, j = p % HALF,
// i.e. packed positions (p / HALF) * CPW + j and + HALF of the share.
__host__ __device__ constexpr int pair_lo(int p) { return (p / HALF) * CPW + p % HALF; }
__host__ __device__ constexpr int field_bit(int p) { return BITS * (p % HALF < FIT ? p % HALF : p % HALF - FIT); }
// the fp16 bit pattern of 2^(10 - e), in both halves: OR-ed into the field, it is also the bias
__host__ __device__ constexpr u32 bias_pair(int p) { return ((25u - field_bit(p)) << 10) * 0x10001u; }

__device__ __forceinline__ u32 code_pair(const u32* words, int p) {
    const u32 w = p % HALF < FIT ? words[p / HALF] : words[p / HALF] >> (BITS * FIT);
    u32 d;  // one LOP3 (w & mask) | bias; left to itself the compiler splits it in two
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(w), "r"((FIELD << field_bit(p)) * 0x10001u), "r"(bias_pair(p)));
    return d;
}

// fp16 elements x and x + dist of a natural-order span (word j = elements 2j, 2j+1) as one pair
__device__ __forceinline__ u32 gather_pair(const u32* words, int x, int dist) {
    const u32 a = words[x / 2], b = words[(x + dist) / 2];
    return (x & 1) ? __byte_perm(a, b, 0x7632) : __byte_perm(a, b, 0x5410);
}

// where token t's probability sits in a head's row of the probability tile: the order in which
// the V operand's owner thread reads its pairs (thread t / TOK_T, pair p, half h -> 2p + h)
__device__ __forceinline__ int prob_slot(int t) {
    const int u = t % TOK_T, w = u % CPW;
    return (t / TOK_T) * TOK_T + 2 * ((u / CPW) * HALF + w % HALF) + w / HALF;
}

// ---- GEAR's sparse outliers as one more mma tile: sum_i onehot(row == row_i) * w_i -------------------
// A slot tile is 16 slots (the mma's K); a thread holds slots 2c, 2c+1 (k lo) and 2c+8, 2c+9 (k hi).
constexpr int SLOT_TILES = (NUM_OUTLIERS + 15) / 16;

// index (token * HEAD_SIZE + channel) and fp16 value of the thread's four slots of tile `tile`;
// slots past NUM_OUTLIERS get value 0
__device__ __forceinline__ void load_slots(const u8* sparse, int tile, int c, int* idx, float* val) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int slot = 16 * tile + 2 * c + (j & 1) + 8 * (j >> 1);
        const bool real = slot < NUM_OUTLIERS;
        const int safe = real ? slot : 0;
        idx[j] = reinterpret_cast<const u16*>(sparse)[safe] & (BLOCK_SIZE * HEAD_SIZE - 1);
        val[j] = real ? f16_bits_to_f32(reinterpret_cast<const u16*>(sparse)[NUM_OUTLIERS + safe]) : 0.f;
    }
}

// one-hot A fragment registers from per-slot row positions: bit k of `bits` (slot 2c or 2c+8 in the low
// half, its neighbour in the high half) marks that the slot sits in the thread's k-th row (k = 2 m-tile +
// row half); the fragment for position k is fp16 2.0 where marked (one shift, one mask), so B carries w / 2
__device__ __forceinline__ u32 onehot_pair(u32 bits, int k) {
    const u32 at14 = k <= 14 ? bits << (14 - k) : bits >> (k - 14);
    return at14 & 0x40004000u;
}

struct alignas(16) WarpSmem {  // 16-byte loads read the probability tile
    u16 prob[N8 * BLOCK_SIZE];                  // p (fp16) per head, in prob_slot order
    float out[N8 * HEAD_SIZE];                  // at the end, the warp's accumulator
    float max[N8], sum[N8];
};

struct State {
    float acc[VMT][4];                          // out^T: rows = channels (16 mt + 2r, + 1), cols = heads 2c, 2c+1
    float vcorr[V_GROUPS][2];                   // p.z - bias terms, per V group and head
    float m[2], l[2];                           // running max (base 2), this thread's share of the sum
};

// ---- one block ------------------------------------------------------------------------------------

// a model-dtype row's share of the thread (CH_T elements as CH_T / 2 words, bf16 if Q_BF16 else fp16), as fp32
__device__ __forceinline__ void share_floats(const u32* w, float* f) {
#pragma unroll
    for (int i = 0; i < CH_T / 2; ++i) {
        f[2 * i] = Q_BF16 ? __uint_as_float(w[i] << 16) : lo_f16(w[i]);
        f[2 * i + 1] = Q_BF16 ? __uint_as_float(w[i] & 0xffff0000u) : hi_f16(w[i]);
    }
}

// the fp16 fragment pairs of a row share: register p holds channels c * CH_T + pair_lo(p) and + HALF,
// the order the packed codes come in, so query and exact keys meet the codes' pairing
__device__ __forceinline__ void fragment_pairs(const float* f, u32* out) {
#pragma unroll
    for (int p = 0; p < KP; ++p) out[p] = pack_f16(f[pair_lo(p)], f[pair_lo(p) + HALF]);
}

// one exact key row (the partial block's, from the tail) as the thread's fragment pairs
__device__ __forceinline__ void exact_key_pairs(const u16* key_row, int c, u32* out) {
    u32 w[CH_T / 2];
    load_span<CH_T / 2>(reinterpret_cast<const u8*>(key_row + c * CH_T), w);
    float kf[CH_T];
    share_floats(w, kf);
    fragment_pairs(kf, out);
}

template <bool COMPLETE>
__device__ __forceinline__ void attend_block(const u8* page, int valid, const u32* qpair, const float* sq,
                                             float scale_log2, State& st, WarpSmem& ws, int lane,
                                             const u16* tail_keys) {
    const int r = lane >> 2, c = lane & 3;
    // ---- loads: K rows 16 mt + r (+8), V rows (channels) 16 mt + 2r (+1), the metadata spans
    u32 kc[MT][2][KW], vc[VMT][2][VW];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            load_span<KW>(page + K_CODES_OFF + (16 * mt + r + 8 * h) * KROW + c * 4 * KW, kc[mt][h]);
#pragma unroll
    for (int mt = 0; mt < VMT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            load_span<VW>(page + V_CODES_OFF + (16 * mt + 2 * r + h) * VROW + c * 4 * VW, vc[mt][h]);
    constexpr int VMW = TOK_T * V_GROUPS / 2;   // words of a thread's V scales (or zeros)
    u32 vs[VMW], vz[VMW];
    load_span<VMW>(page + V_META_OFF + 2 * c * TOK_T * V_GROUPS, vs);
    load_span<VMW>(page + V_META_OFF + 2 * BLOCK_SIZE * V_GROUPS + 2 * c * TOK_T * V_GROUPS, vz);

    // ---- scores^T (tokens x heads), raw q units
    float s[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) s[mt][0] = s[mt][1] = s[mt][2] = s[mt][3] = 0.f;
    if (COMPLETE) {
        u32 ks[KP], kz[KP];                     // natural-order fp16 words of the thread's channels
        load_span<KP>(page + K_META_OFF + 2 * c * CH_T, ks);
        load_span<KP>(page + K_META_OFF + 2 * HEAD_SIZE + 2 * c * CH_T, kz);
        u32 qs[KP];
#pragma unroll
        for (int p = 0; p < KP; ++p) qs[p] = mul_f16x2(qpair[p], gather_pair(ks, pair_lo(p), HALF));
#pragma unroll
        for (int kt = 0; kt < KT; ++kt)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
                mma(s[mt], code_pair(kc[mt][0], 2 * kt), code_pair(kc[mt][1], 2 * kt),
                    code_pair(kc[mt][0], 2 * kt + 1), code_pair(kc[mt][1], 2 * kt + 1), qs[2 * kt], qs[2 * kt + 1]);
        // corr: rows 0-7 give q.z - sum(bias * q s), rows 8-15 q.b (GEAR's low-rank K)
        float corr[4] = {0.f, 0.f, 0.f, 0.f};
        u32 kb[KP];
        if (RANK) load_span<KP>(page + K_LOWRANK_OFF + 2 * BLOCK_SIZE + 2 * c * CH_T, kb);
#pragma unroll
        for (int kt = 0; kt < KT; ++kt) {
            const u32 b0 = RANK ? gather_pair(kb, pair_lo(2 * kt), HALF) : 0u;
            const u32 b1 = RANK ? gather_pair(kb, pair_lo(2 * kt + 1), HALF) : 0u;
            mma(corr, gather_pair(kz, pair_lo(2 * kt), HALF), b0, gather_pair(kz, pair_lo(2 * kt + 1), HALF), b1,
                qpair[2 * kt], qpair[2 * kt + 1]);
            mma(corr, bias_pair(2 * kt) | FP16_SIGN, 0u, bias_pair(2 * kt + 1) | FP16_SIGN, 0u, qs[2 * kt],
                qs[2 * kt + 1]);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float v = s[mt][i] + corr[i & 1];
                if (RANK) {
                    const int t = 16 * mt + r + 8 * (i >> 1);
                    v += f16_bits_to_f32(reinterpret_cast<const u16*>(page + K_LOWRANK_OFF)[t]) * corr[2 + (i & 1)];
                }
                s[mt][i] = v;
            }
        if (NUM_OUTLIERS) {
            // scores^T[t, n] += value_i q_n[ch_i] for slots at token t: rows are tokens 16 mt + r + 8 h
#pragma unroll
            for (int tile = 0; tile < SLOT_TILES; ++tile) {
                int idx[4];
                float val[4];
                load_slots(page + K_SPARSE_OFF, tile, c, idx, val);
                u32 bits[2] = {0u, 0u}, w[2];
                float wf[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int t = idx[j] / HEAD_SIZE, ch = idx[j] % HEAD_SIZE;
                    if ((t & 7) == r) bits[j >> 1] |= 1u << ((t >> 3) + 16 * (j & 1));
                    wf[j] = 0.5f * val[j] * sq[r * HEAD_SIZE + ch];
                }
                w[0] = pack_f16(wf[0], wf[1]);
                w[1] = pack_f16(wf[2], wf[3]);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    mma(s[mt], onehot_pair(bits[0], 2 * mt), onehot_pair(bits[0], 2 * mt + 1),
                        onehot_pair(bits[1], 2 * mt), onehot_pair(bits[1], 2 * mt + 1), w[0], w[1]);
            }
        }
    } else if (EXACT_TAIL) {
        // the partial block's keys, exact: rows 16 mt + r (+8) of the tail, as fp16 A fragments
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            u32 k0[KP], k1[KP];
            exact_key_pairs(tail_keys + (16 * mt + r) * HEAD_SIZE, c, k0);
            exact_key_pairs(tail_keys + (16 * mt + r + 8) * HEAD_SIZE, c, k1);
#pragma unroll
            for (int kt = 0; kt < KT; ++kt)
                mma(s[mt], k0[2 * kt], k1[2 * kt], k0[2 * kt + 1], k1[2 * kt + 1], qpair[2 * kt], qpair[2 * kt + 1]);
        }
    } else {
        // staging: per token and channel group g, K = (code - QMAX/2) * s_tg: one product per group with
        // the query masked to the group's channels; rows 0-7 of the constant tile give sum(bias * q_g),
        // rows 8-15 sum(q_g)
#pragma unroll
        for (int g = 0; g < STAGE_GROUPS; ++g) {
            u32 qg[KP];
#pragma unroll
            for (int p = 0; p < KP; ++p) qg[p] = (c * CH_T + pair_lo(p)) / K_STAGE_GROUP == g ? qpair[p] : 0u;
            float d[MT][4], k0[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) d[mt][0] = d[mt][1] = d[mt][2] = d[mt][3] = 0.f;
#pragma unroll
            for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    mma(d[mt], code_pair(kc[mt][0], 2 * kt), code_pair(kc[mt][1], 2 * kt),
                        code_pair(kc[mt][0], 2 * kt + 1), code_pair(kc[mt][1], 2 * kt + 1), qg[2 * kt], qg[2 * kt + 1]);
                mma(k0, bias_pair(2 * kt), FP16_ONE * 0x10001u, bias_pair(2 * kt + 1), FP16_ONE * 0x10001u,
                    qg[2 * kt], qg[2 * kt + 1]);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int t = 16 * mt + r + 8 * (i >> 1);
                    const float tok_scale = f16_bits_to_f32(
                        reinterpret_cast<const u16*>(page + K_META_OFF)[t * STAGE_GROUPS + g]);
                    s[mt][i] += tok_scale * (d[mt][i] - k0[i & 1] - 0.5f * QMAX * k0[2 + (i & 1)]);
                }
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[mt][i] *= scale_log2;
            if (!COMPLETE && 16 * mt + r + 8 * (i >> 1) >= valid) s[mt][i] = neg_inf();
        }

    // ---- online softmax (heads 2c, 2c+1; tokens spread over r)
    float alpha[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        float mx = st.m[j];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mx = fmaxf(mx, fmaxf(s[mt][j], s[mt][2 + j]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        alpha[j] = exp2_approx(st.m[j] - mx);
        st.m[j] = mx;
    }
    float psum[2] = {0.f, 0.f};
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[mt][i] = exp2_approx(s[mt][i] - st.m[i & 1]);
            psum[i & 1] += s[mt][i];
        }
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int mt = 0; mt < VMT; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) st.acc[mt][i] *= alpha[i & 1];
#pragma unroll
        for (int g = 0; g < V_GROUPS; ++g) {
            st.vcorr[g][0] *= alpha[0];
            st.vcorr[g][1] *= alpha[1];
        }
    }
    st.l[0] = st.l[0] * alpha[0] + psum[0];
    st.l[1] = st.l[1] * alpha[1] + psum[1];

    // ---- probabilities to the V operand's layout (tokens by c, heads by r), through shared memory
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int slot = prob_slot(16 * mt + r + 8 * (i >> 1));
            ws.prob[(2 * c + (i & 1)) * BLOCK_SIZE + slot] = (u16)(pack_f16(s[mt][i], 0.f) & 0xffffu);
        }
    __syncwarp();
    u32 pp[VP];
    load_span<VP>(reinterpret_cast<const u8*>(&ws.prob[r * BLOCK_SIZE + c * TOK_T]), pp);

    // ---- out^T (channels x heads) += V^T (p s_t), per V group
    float lowrank[2] = {0.f, 0.f};
#pragma unroll
    for (int g = 0; g < V_GROUPS; ++g) {
        u32 ps[VP], zv[VP];
#pragma unroll
        for (int p = 0; p < VP; ++p) {
            u32 sp = gather_pair(vs, pair_lo(p) * V_GROUPS + g, HALF * V_GROUPS);
            u32 zp = gather_pair(vz, pair_lo(p) * V_GROUPS + g, HALF * V_GROUPS);
            if (!COMPLETE) {  // unwritten tokens' metadata is not zeroed by anyone: keep it out of the sums
                const u32 keep = (c * TOK_T + pair_lo(p) < valid ? 0xffffu : 0u) |
                                 (c * TOK_T + pair_lo(p) + HALF < valid ? 0xffff0000u : 0u);
                sp &= keep;
                zp &= keep;
            }
            ps[p] = mul_f16x2(pp[p], sp);
            zv[p] = zp;
        }
#pragma unroll
        for (int mt = 0; mt < VMT; ++mt) {
            if ((16 * mt) / V_GROUP != g) continue;
#pragma unroll
            for (int kt = 0; kt < VKT; ++kt)
                mma(st.acc[mt], code_pair(vc[mt][0], 2 * kt), code_pair(vc[mt][1], 2 * kt),
                    code_pair(vc[mt][0], 2 * kt + 1), code_pair(vc[mt][1], 2 * kt + 1), ps[2 * kt], ps[2 * kt + 1]);
        }
        // rows 0-7: p.z - sum(bias * p s); rows 8-15: p.a (GEAR's low-rank V, once)
        constexpr bool LOWRANK_V = COMPLETE && RANK;
        u32 av[VP];
        if (LOWRANK_V && g == 0) load_span<VP>(page + V_LOWRANK_OFF + 2 * c * TOK_T, av);
        float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kt = 0; kt < VKT; ++kt) {
            const u32 a0 = LOWRANK_V && g == 0 ? gather_pair(av, pair_lo(2 * kt), HALF) : 0u;
            const u32 a1 = LOWRANK_V && g == 0 ? gather_pair(av, pair_lo(2 * kt + 1), HALF) : 0u;
            mma(d, zv[2 * kt], a0, zv[2 * kt + 1], a1, pp[2 * kt], pp[2 * kt + 1]);
            mma(d, bias_pair(2 * kt) | FP16_SIGN, 0u, bias_pair(2 * kt + 1) | FP16_SIGN, 0u, ps[2 * kt], ps[2 * kt + 1]);
        }
        st.vcorr[g][0] += d[0];
        st.vcorr[g][1] += d[1];
        if (g == 0) {
            lowrank[0] = d[2];
            lowrank[1] = d[3];
        }
    }
    if (COMPLETE && RANK) {
        // out[ch] += b[ch] * (p.a)
#pragma unroll
        for (int mt = 0; mt < VMT; ++mt) {
            const u32 b = reinterpret_cast<const u32*>(page + V_LOWRANK_OFF + 2 * BLOCK_SIZE)[8 * mt + r];
            const float b0 = lo_f16(b), b1 = hi_f16(b);
            st.acc[mt][0] += b0 * lowrank[0];
            st.acc[mt][1] += b0 * lowrank[1];
            st.acc[mt][2] += b1 * lowrank[0];
            st.acc[mt][3] += b1 * lowrank[1];
        }
    }
    if (COMPLETE && NUM_OUTLIERS) {
        // out^T[ch, n] += value_i p_n[t_i] for slots at channel ch: rows are channels 16 mt + 2r + h,
        // and the accumulator was rescaled to this block's max already
#pragma unroll
        for (int tile = 0; tile < SLOT_TILES; ++tile) {
            int idx[4];
            float val[4];
            load_slots(page + V_SPARSE_OFF, tile, c, idx, val);
            u32 bits[2] = {0u, 0u}, u[2];
            float uf[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int t = idx[j] / HEAD_SIZE, ch = idx[j] % HEAD_SIZE;
                if (((ch >> 1) & 7) == r) bits[j >> 1] |= 1u << (2 * (ch >> 4) + (ch & 1) + 16 * (j & 1));
                uf[j] = 0.5f * val[j] * f16_bits_to_f32(ws.prob[r * BLOCK_SIZE + prob_slot(t)]);
            }
            u[0] = pack_f16(uf[0], uf[1]);
            u[1] = pack_f16(uf[2], uf[3]);
#pragma unroll
            for (int mt = 0; mt < VMT; ++mt)
                mma(st.acc[mt], onehot_pair(bits[0], 2 * mt), onehot_pair(bits[0], 2 * mt + 1),
                    onehot_pair(bits[1], 2 * mt), onehot_pair(bits[1], 2 * mt + 1), u[0], u[1]);
        }
    }
    __syncwarp();  // the probability tile is rewritten by the next block
}

// ---- the kernel -----------------------------------------------------------------------------------

// (view block, head slot) of a KV head's logical block b in a head-wise packed row: the kept blocks
// and the tail in the head's own slot, a retrieval head's middle chunk c as unit c * R + rank
__device__ __forceinline__ void headwise_block(int b, int kv_head, int rank, int kept, int chunks, int middle,
                                               int retrieval_heads, int& view_block, int& slot) {
    if (b < kept) return;
    if (rank >= 0 && b < kept + chunks) {
        const int unit = (b - kept) * retrieval_heads + rank;
        view_block = kept + unit / gridDim.y;
        slot = unit % gridDim.y;
    } else {
        view_block = rank >= 0 ? b - chunks + middle : b + middle;
    }
}

extern "C" __global__ void __launch_bounds__(NUM_WARPS * 32, MIN_CTAS)
kvpress_decode_split(const u16* __restrict__ q, int stride_qt, int stride_qh, const u8* __restrict__ cache,
                     int stride_cb, int stride_ch, const int* __restrict__ block_table, int stride_bt,
                     const int* __restrict__ seq_lens, float* __restrict__ part_out, float* __restrict__ part_max,
                     float* __restrict__ part_sum, int num_splits, double scale_log2_arg,
                     const int* __restrict__ headwise, const int* __restrict__ retrieval, int retrieval_heads,
                     const u16* __restrict__ tail, int stride_ts, int stride_th, const int* __restrict__ tail_slots) {
    __shared__ WarpSmem smem[NUM_WARPS];
    __shared__ float sq[NUM_OUTLIERS ? N8 * HEAD_SIZE : 1];   // the group's query rows in fp32, for outliers
    const int seq = blockIdx.x, kv_head = blockIdx.y, split = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane >> 2, c = lane & 3;
    const float scale_log2 = (float)scale_log2_arg;
    WarpSmem& ws = smem[warp];

    // query operand: head r of the group (zero for padding), the thread's channels in fragment order
    u32 qpair[KP];
    {
        u32 qw[CH_T / 2];
        if (r < GROUP) {
            load_span<CH_T / 2>(reinterpret_cast<const u8*>(q + (long long)seq * stride_qt +
                                                            (long long)(kv_head * GROUP + r) * stride_qh + c * CH_T), qw);
        } else {
#pragma unroll
            for (int i = 0; i < CH_T / 2; ++i) qw[i] = 0u;
        }
        float qf[CH_T];
        share_floats(qw, qf);
        fragment_pairs(qf, qpair);
        if (NUM_OUTLIERS && warp == 0) {
#pragma unroll
            for (int i = 0; i < CH_T; ++i) sq[r * HEAD_SIZE + c * CH_T + i] = qf[i];
        }
    }
    __syncthreads();

    State st;
#pragma unroll
    for (int mt = 0; mt < VMT; ++mt) st.acc[mt][0] = st.acc[mt][1] = st.acc[mt][2] = st.acc[mt][3] = 0.f;
#pragma unroll
    for (int g = 0; g < V_GROUPS; ++g) st.vcorr[g][0] = st.vcorr[g][1] = 0.f;
    st.m[0] = st.m[1] = neg_inf();
    st.l[0] = st.l[1] = 0.f;

    // head-wise packed rows (razor, vllm_kvpress/eviction/headwise.py): (K, n, M) per row and each KV
    // head's retrieval rank; with no retrieval heads every block maps to itself
    int seq_len = seq_lens[seq];
    int kept = 0, chunks = 0, middle = 0, rank = -1;
    if (retrieval_heads > 0) {
        kept = headwise[3 * seq];
        chunks = headwise[3 * seq + 1];
        middle = headwise[3 * seq + 2];
        rank = retrieval[kv_head];
        seq_len += ((rank >= 0 ? chunks : 0) - middle) * BLOCK_SIZE;
    }
    const int num_blocks = (seq_len + BLOCK_SIZE - 1) / BLOCK_SIZE;
    const int per_split = (num_blocks + num_splits - 1) / num_splits;
    const int first = split * per_split;
    const int last = min(first + per_split, num_blocks);
    const int num_complete = seq_len / BLOCK_SIZE;
    const int* row = block_table + (long long)seq * stride_bt;
    // with an exact tail, the partial block's keys are there, under the request's state slot
    const u16* tail_keys = EXACT_TAIL ? tail + (long long)tail_slots[seq] * stride_ts + (long long)kv_head * stride_th
                                      : nullptr;
    for (int b = first + warp; b < last; b += NUM_WARPS) {
        int view_block = b, slot = kv_head;
        if (retrieval_heads > 0) headwise_block(b, kv_head, rank, kept, chunks, middle, retrieval_heads, view_block, slot);
        const u8* page = cache + (long long)row[view_block] * stride_cb + (long long)slot * stride_ch;
        if (b < num_complete)
            attend_block<true>(page, BLOCK_SIZE, qpair, sq, scale_log2, st, ws, lane, tail_keys);
        else
            attend_block<false>(page, seq_len - b * BLOCK_SIZE, qpair, sq, scale_log2, st, ws, lane, tail_keys);
    }

    // ---- the warp's result: sum over r, the deferred terms, then merge the warps of the CTA
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        st.l[j] += __shfl_xor_sync(0xffffffffu, st.l[j], 4);
        st.l[j] += __shfl_xor_sync(0xffffffffu, st.l[j], 8);
        st.l[j] += __shfl_xor_sync(0xffffffffu, st.l[j], 16);
    }
#pragma unroll
    for (int mt = 0; mt < VMT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) st.acc[mt][i] += st.vcorr[(16 * mt) / V_GROUP][i & 1];
#pragma unroll
    for (int mt = 0; mt < VMT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) ws.out[(2 * c + (i & 1)) * HEAD_SIZE + 16 * mt + 2 * r + (i >> 1)] = st.acc[mt][i];
    if (r == 0) {
        ws.max[2 * c] = st.m[0];
        ws.max[2 * c + 1] = st.m[1];
        ws.sum[2 * c] = st.l[0];
        ws.sum[2 * c + 1] = st.l[1];
    }
    __syncthreads();

    const long long part = (long long)seq * num_splits + split;
    const long long base = part * (gridDim.y * GROUP) + kv_head * GROUP;
    for (int e = threadIdx.x; e < GROUP * HEAD_SIZE; e += NUM_WARPS * 32) {
        const int n = e / HEAD_SIZE, ch = e % HEAD_SIZE;
        float mx = neg_inf();
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) mx = fmaxf(mx, smem[w].max[n]);
        float acc = 0.f, sum = 0.f;
#pragma unroll
        for (int w = 0; w < NUM_WARPS; ++w) {
            const float weight = mx == neg_inf() ? 0.f : exp2_approx(smem[w].max[n] - mx);
            acc += weight * smem[w].out[n * HEAD_SIZE + ch];
            sum += weight * smem[w].sum[n];
        }
        part_out[(base + n) * HEAD_SIZE + ch] = acc;
        if (ch == 0) {
            part_max[base + n] = mx;
            part_sum[base + n] = sum;
        }
    }
}
