// One decoder layer of a Llama-family model for one new token per row, in a single call, on our block
// matmul (q4_kernel.cpp, included: one translation unit, one library). backend/serving/decode_step.py calls it
// once per layer; the math is DecodeStep's (RMSNorm, RoPE, grouped-query attention over the KV cache,
// SwiGLU), all float32 outside the matmuls; the KV cache is float32, float16 (decode_layer_f16) or int8
// (decode_layer_q8), the engine's choice.
//
// Why float16 keys and values: at long contexts a decode step's time goes to reading the cache (SmolLM2 at
// 1500 tokens: 69 MB a step in float32, ~8 ms at this machine's ~9 GB/s), so half the bytes is half that
// time; float16's 11-bit significand rounds a key or value by at most 2^-11 of itself, as llama.cpp's
// default f16 cache and vLLM's half-precision caches do. The int8 cache is llama.cpp's q8_0 (`--cache-type-k
// q8_0`): a slot's hd values as int8 then one float16 scale per 32 of them, hd + hd/16 bytes (68 for hd 64,
// a quarter of float32's 256), rounding a value by at most half a step of 1/127 of its block's largest.
//
// Why: at one token per step the torch version of this layer is ~30 small ops, and on a CPU their
// dispatch cost (~10 us each) was half of a SmolLM2 decode step, as much as all the matmuls.
#include <math.h>

#include "q4_kernel.cpp"

// e^x, x clamped to [-88, 88] (float32's range): e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2,
// e^r by its Taylor series to r^7 (relative error ~1e-7), 2^n applied by scalef.
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts (Cody-Waite)
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    const float c[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (float k : c) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
    return _mm512_scalef_ps(p, n);
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// out = x / sqrt(mean(x^2) + eps) * w, one row of n (a multiple of 16)
static void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
    __m512 ss = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) ss = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i), ss);
    __m512 inv = _mm512_set1_ps(1.0f / sqrtf(hsum(ss) / n + eps));
    for (int i = 0; i < n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), inv), _mm512_loadu_ps(w + i)));
}

// rotate one head in place as HF's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin (hd = 2 * half)
static void rope(float* x, const float* cos, const float* sin, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

// lane j of the result = the sum of a[j]'s 16 lanes: a transpose-reduce (15 adds, 31 shuffles for 16 sums,
// where 16 horizontal sums cost ~4x that). Each level halves the vectors by adding the two halves of a pair
// side by side; the last level leaves sum j in lane 4 (j % 4) + j / 4, put back in order by one permute.
static inline __m512 sum16(const __m512* a) {
    __m512 b[8], c[4], d[2];
    for (int j = 0; j < 8; j++)
        b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0x44), _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], 0xEE));
    for (int j = 0; j < 4; j++)
        c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88), _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
    for (int j = 0; j < 2; j++)
        d[j] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * j], c[2 * j + 1], 0x44), _mm512_shuffle_ps(c[2 * j], c[2 * j + 1], 0xEE));
    __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, e);
}

// The softmax state of `REP` query heads (sharing one kv head) over slots from..to-1 of it, in one pass
// over the keys and values, 16 slots at a time (online softmax): head r's state at st + r (hd + 2) is
// max, sum, acc[hd], where acc = sum_s e^(score_s - max) v_s and sum = sum_s e^(score_s - max), score = q . k_s / sqrt(hd).
// A row's slots are attended in fixed chunks (ATTEND_CHUNK), whose states `attend_merge` merges.
static const int PREFETCH = 64;  // slots ahead
static const int ATTEND_CHUNK = 256;  // slots a work item attends over (decode_layer_impl)
typedef uint16_t half_t;         // IEEE float16 bits: a float16 cache (decode_layer_f16)

struct q8_t { int8_t b; };        // a byte of an int8 cache slot (decode_layer_q8; backend/serving/kv_quant.py)
static const int Q8_BLOCK = 32;  // values per float16 scale

// cache elements from one slot to the next of a kv head: hd values, plus the scales for int8
template <typename kv_t> static inline size_t kv_ld(int hd) { return hd; }
template <> inline size_t kv_ld<q8_t>(int hd) { return hd + hd / 16; }

static inline __m512 load_kv(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_kv(const half_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// n floats (a multiple of 16) into the cache; float16 rounded to nearest even (as torch's .half())
static inline void store_kv(float* dst, const float* src, int n) { memcpy(dst, src, n * 4); }
static inline void store_kv(half_t* dst, const float* src, int n) {
    for (int i = 0; i < n; i += 16)
        _mm256_storeu_si256((__m256i*)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// int8, as kv_quant.quantize (bitwise): per 32 values d = max|x| / 127, q = round-half-even(x * (1 / d)),
// d kept as float16 after the n values
static inline void store_kv(q8_t* dst, const float* src, int n) {
    for (int b = 0; b < n / Q8_BLOCK; b++) {
        const float* x = src + b * Q8_BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < Q8_BLOCK; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        for (int i = 0; i < Q8_BLOCK; i++) {
            float r = nearbyintf(x[i] * inv);  // the default rounding mode: to nearest, ties to even
            dst[b * Q8_BLOCK + i].b = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
        }
        uint16_t h = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        memcpy(dst + n + 2 * b, &h, 2);
    }
}

// head r's state at st + r (hd + 2), as nothing seen yet: max -inf, sum 0, acc 0; its three parts' addresses
static inline void empty_states(float* st, int rep, int hd, float** mx, float** sum, float** acc) {
    for (int r = 0; r < rep; r++) {
        mx[r] = st + r * (hd + 2), sum[r] = mx[r] + 1, acc[r] = mx[r] + 2;
        *mx[r] = -INFINITY, *sum[r] = 0.0f;
        memset(acc[r], 0, hd * 4);
    }
}

template <int REP, typename kv_t>
static void attend_chunk(const float* q, const kv_t* k, const kv_t* v, int from, int to, int hd, float* st) {
    float *mx[REP], *sum[REP], *acc[REP];
    empty_states(st, REP, hd, mx, sum, acc);
    const __m512 scale = _mm512_set1_ps(1.0f / sqrtf((float)hd));
    alignas(64) float p[REP][16];
    for (int s0 = from; s0 < to; s0 += 16) {
        int n = to - s0 < 16 ? to - s0 : 16;
        __mmask16 valid = (__mmask16)((1u << n) - 1);
        const kv_t* kr[16];  // past the last slot: the last slot again, its lane masked off
        for (int j = 0; j < 16; j++) kr[j] = k + (size_t)(s0 + (j < n ? j : n - 1)) * hd;
        // the keys and values stream from memory (the cache outgrows the caches): ask for blocks ahead
        for (int line = 0; line < 16 * hd; line += 64 / (int)sizeof(kv_t)) {  // 64-byte lines
            _mm_prefetch((const char*)(k + (size_t)(s0 + PREFETCH) * hd + line), _MM_HINT_T0);
            _mm_prefetch((const char*)(v + (size_t)(s0 + PREFETCH) * hd + line), _MM_HINT_T0);
        }
        float corr[REP];
        for (int r = 0; r < REP; r++) {
            __m512 dot[16];
            for (int j = 0; j < 16; j++) {
                dot[j] = _mm512_setzero_ps();
                for (int i = 0; i < hd; i += 16)
                    dot[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * hd + i), load_kv(kr[j] + i), dot[j]);
            }
            __m512 score = _mm512_mul_ps(sum16(dot), scale);
            float top = _mm512_mask_reduce_max_ps(valid, score);
            top = top > *mx[r] ? top : *mx[r];
            corr[r] = expf(*mx[r] - top);  // 0 on the first block (max = -inf)
            *mx[r] = top;
            __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(score, _mm512_set1_ps(top))));
            *sum[r] = *sum[r] * corr[r] + _mm512_reduce_add_ps(e);
            _mm512_store_ps(p[r], e);
        }
        for (int i = 0; i < hd; i += 16) {
            __m512 a[REP];
            for (int r = 0; r < REP; r++) a[r] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + i), _mm512_set1_ps(corr[r]));
            for (int j = 0; j < n; j++) {
                __m512 vj = load_kv(v + (size_t)(s0 + j) * hd + i);
                for (int r = 0; r < REP; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), vj, a[r]);
            }
            for (int r = 0; r < REP; r++) _mm512_storeu_ps(acc[r] + i, a[r]);
        }
    }
}

// The AVX2 build's version of attend_chunk (and both builds' for an int8 cache): 8 slots a block (one ymm of
// scores), each key and value read (and converted) once for all REP heads. attend_chunk through the shim
// re-read and re-converted every key once per head and spilled its 16 two-register accumulators: at 1500
// tokens of context it ran at a third of this machine's memory speed (SmolLM2, 30 layers, float16 cache:
// 5.7 ms a token on one core, 35 MB read).
// values i..i+15 of a slot (`row`) as two ymm; an int8 cache's unscaled (attend_chunk8 applies the scales)
static inline void load_kv16(const float* row, int i, __m256& a, __m256& b) {
    a = _mm256_loadu_ps(row + i), b = _mm256_loadu_ps(row + i + 8);
}
static inline void load_kv16(const half_t* row, int i, __m256& a, __m256& b) {
    a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row + i)));
    b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row + i + 8)));
}
static inline void load_kv16(const q8_t* row, int i, __m256& a, __m256& b) {
    __m128i q = _mm_loadu_si128((const __m128i*)(row + i));
    a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
}

// The scales of slots s0..s0+7 (past the last slot n - 1: the last slot's) as d[b] = block b's 8 scales,
// for an int8 cache with hd % 64 == 0 (scales in pairs: one 32-bit word). Loaded into registers, not through
// an array on the stack (whose narrow stores a wide load cannot forward from: a stall a block).
static inline void q8_scales8(const q8_t* kv, int s0, int n, size_t ld, int hd, __m256* d) {
    const __m256i even = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i odd = _mm256_add_epi8(even, _mm256_setr_epi8(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0));
    int32_t w[8];
    for (int pair = 0; pair < hd / (2 * Q8_BLOCK); pair++) {
        for (int j = 0; j < 8; j++) memcpy(w + j, kv + (size_t)(s0 + (j < n ? j : n - 1)) * ld + hd + 4 * pair, 4);
        __m256i x = _mm256_setr_epi32(w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]);
        d[2 * pair] = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(x, even), 0x08)));
        d[2 * pair + 1] = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(x, odd), 0x08)));
    }
}

// lane j = the sum of a[j]'s 8 lanes (hadd pairs, then the two 128-bit halves)
static inline __m256 sum8(const __m256* a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
static inline __m256i sum8i(const __m256i* a) {  // the same for int32 lanes (exact)
    __m256i t0 = _mm256_hadd_epi32(a[0], a[1]), t1 = _mm256_hadd_epi32(a[2], a[3]);
    __m256i t2 = _mm256_hadd_epi32(a[4], a[5]), t3 = _mm256_hadd_epi32(a[6], a[7]);
    __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

#if defined(__AVX512VNNI__)
static inline __m256 exp8(__m256 x) { return _mm512_castps512_ps256(exp512(_mm512_zextps256_ps512(x))); }
static inline float em_hsum8(__m256 v) { return _mm512_reduce_add_ps(_mm512_zextps256_ps512(v)); }
static inline float em_hmax8(__m256 v) {
    return _mm512_mask_reduce_max_ps((__mmask16)0xFF, _mm512_zextps256_ps512(v));
}
#else
static inline __m256 exp8(__m256 x) { return exp512(em512{x, x}).lo; }  // both halves computed: once a block, cheap
#endif

// An int8 cache's slot is scaled per 32 values: a key's dot with a query is summed per 32-value block and each
// block's sum (8 slots at once) times its scales; a value's scale goes into its softmax weight. Scaling each
// value as it is read instead made the int8 attention slower than the float16 one (compute-bound).
template <int REP, typename kv_t>
static void attend_chunk8(const float* q, const kv_t* k, const kv_t* v, int from, int to, int hd, float* st) {
    const bool q8 = sizeof(kv_t) == 1;
    const int blk = q8 ? Q8_BLOCK : hd;  // values sharing a scale (float: the whole slot, no scale)
    float *mx[REP], *sum[REP], *acc[REP];
    empty_states(st, REP, hd, mx, sum, acc);
    const __m256 scale = _mm256_set1_ps(1.0f / sqrtf((float)hd)), ninf = _mm256_set1_ps(-INFINITY);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    alignas(32) float p[REP][8], pv[REP][8];
    __m256 dot[REP][8];
    const size_t ld = kv_ld<kv_t>(hd);
    __m256i qq[REP][8];  // int8 cache: the queries as int8 per 32 values (hd <= 256), scales dq
    float dq[REP][8];
    for (int r = 0; q8 && r < REP; r++)
        for (int b = 0; b < hd / Q8_BLOCK; b++) {
            q8_t t[Q8_BLOCK + 2];
            store_kv(t, q + r * hd + b * Q8_BLOCK, Q8_BLOCK);
            qq[r][b] = _mm256_loadu_si256((const __m256i*)t);
            uint16_t h;
            memcpy(&h, t + Q8_BLOCK, 2);
            dq[r][b] = _cvtsh_ss(h);
        }
    for (int s0 = from; s0 < to; s0 += 8) {
        int n = to - s0 < 8 ? to - s0 : 8;
        __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
        __m256 score[REP], dk[8], dv[8];  // int8 cache: the 8 slots' key and value scales per block
        if (q8) {
            q8_scales8((const q8_t*)k, s0, n, ld, hd, dk);
            q8_scales8((const q8_t*)v, s0, n, ld, hd, dv);
        }
        for (int b0 = 0; b0 < hd; b0 += blk) {
            if (q8) {  // int8 keys against the int8 queries: exact integer dots of 32 values (as llama.cpp's q8_0)
                const __m256i ones = _mm256_set1_epi16(1);
                __m256i isum[REP][8];
                for (int j = 0; j < 8; j++) {
                    const int8_t* kj = (const int8_t*)k + (size_t)(s0 + (j < n ? j : n - 1)) * ld + b0;
                    __m256i kb = _mm256_loadu_si256((const __m256i*)kj), ka = _mm256_sign_epi8(kb, kb);
                    for (int r = 0; r < REP; r++)  // |k| (u8) times q with k's sign: pairs within int16
                        isum[r][j] = _mm256_madd_epi16(_mm256_maddubs_epi16(ka, _mm256_sign_epi8(qq[r][b0 / blk], kb)), ones);
                }
                for (int r = 0; r < REP; r++) {
                    __m256 dr = _mm256_mul_ps(dk[b0 / blk], _mm256_set1_ps(dq[r][b0 / blk]));
                    __m256 sr = _mm256_cvtepi32_ps(sum8i(isum[r]));
                    score[r] = b0 ? _mm256_fmadd_ps(sr, dr, score[r]) : _mm256_mul_ps(sr, dr);
                }
                continue;
            }
            for (int j = 0; j < 8; j++) {  // past the last slot: the last slot again, its lane masked off
                const kv_t* kj = k + (size_t)(s0 + (j < n ? j : n - 1)) * ld;
                __m256 a[REP][2];  // two partial sums a head: chains half as long
                for (int r = 0; r < REP; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
                for (int i = b0; i < b0 + blk; i += 16) {
                    __m256 k0, k1;
                    load_kv16(kj, i, k0, k1);
                    for (int r = 0; r < REP; r++) {
                        a[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * hd + i), k0, a[r][0]);
                        a[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * hd + i + 8), k1, a[r][1]);
                    }
                }
                for (int r = 0; r < REP; r++) dot[r][j] = _mm256_add_ps(a[r][0], a[r][1]);
            }
            for (int r = 0; r < REP; r++) score[r] = sum8(dot[r]);
        }
        float corr[REP];
        for (int r = 0; r < REP; r++) {
            score[r] = _mm256_mul_ps(score[r], scale);
            float top = em_hmax8(_mm256_blendv_ps(ninf, score[r], valid));
            top = top > *mx[r] ? top : *mx[r];
            corr[r] = expf(*mx[r] - top);  // 0 on the first block (max = -inf)
            *mx[r] = top;
            __m256 e = _mm256_and_ps(valid, exp8(_mm256_sub_ps(score[r], _mm256_set1_ps(top))));
            *sum[r] = *sum[r] * corr[r] + em_hsum8(e);
            _mm256_store_ps(p[r], e);
        }
        for (int i = 0; i < hd; i += 16) {
            if (q8 && i % blk == 0)  // the weights times this block's value scales
                for (int r = 0; r < REP; r++) _mm256_store_ps(pv[r], _mm256_mul_ps(_mm256_load_ps(p[r]), dv[i / blk]));
            const float (*w)[8] = q8 ? pv : p;
            __m256 a[REP][2];
            for (int r = 0; r < REP; r++) {
                a[r][0] = _mm256_mul_ps(_mm256_loadu_ps(acc[r] + i), _mm256_set1_ps(corr[r]));
                a[r][1] = _mm256_mul_ps(_mm256_loadu_ps(acc[r] + i + 8), _mm256_set1_ps(corr[r]));
            }
            for (int j = 0; j < n; j++) {
                __m256 v0, v1;
                load_kv16(v + (size_t)(s0 + j) * ld, i, v0, v1);
                for (int r = 0; r < REP; r++) {
                    __m256 wj = _mm256_broadcast_ss(&w[r][j]);
                    a[r][0] = _mm256_fmadd_ps(wj, v0, a[r][0]);
                    a[r][1] = _mm256_fmadd_ps(wj, v1, a[r][1]);
                }
            }
            for (int r = 0; r < REP; r++) {
                _mm256_storeu_ps(acc[r] + i, a[r][0]);
                _mm256_storeu_ps(acc[r] + i + 8, a[r][1]);
            }
        }
    }
}
#if !defined(__AVX512VNNI__)
#define attend_chunk attend_chunk8
#endif

// the build's attention for float32 / float16 caches; an int8 cache's is attend_chunk8 in both builds
template <int REP, typename kv_t>
static inline void attend_block(const float* q, const kv_t* k, const kv_t* v, int from, int to, int hd, float* st) {
    attend_chunk<REP>(q, k, v, from, to, hd, st);
}
template <int REP>
static inline void attend_block(const float* q, const q8_t* k, const q8_t* v, int from, int to, int hd, float* st) {
    attend_chunk8<REP>(q, k, v, from, to, hd, st);
}

// states of `rep` heads over slots from..to-1 of their kv head; REP is fixed at compile time for the
// common group sizes, other sizes run head by head (keys then read once per head)
template <typename kv_t>
static void attend_range(const float* q, int rep, const kv_t* k, const kv_t* v, int from, int to, int hd, float* st) {
    switch (rep) {
        case 1: return attend_block<1>(q, k, v, from, to, hd, st);
        case 2: return attend_block<2>(q, k, v, from, to, hd, st);
        case 3: return attend_block<3>(q, k, v, from, to, hd, st);
        case 4: return attend_block<4>(q, k, v, from, to, hd, st);
        case 8: return attend_block<8>(q, k, v, from, to, hd, st);
    }
    for (int r = 0; r < rep; r++) attend_block<1>(q + r * hd, k, v, from, to, hd, st + r * (hd + 2));
}

// out[rep][hd] = softmax-weighted values from `split` chunk states (each rep * (hd + 2) floats)
static void attend_merge(const float* st, int split, int rep, int hd, float* out) {
    size_t size = (size_t)rep * (hd + 2);
    for (int r = 0; r < rep; r++) {
        float top = -INFINITY, total = 0.0f;
        for (int c = 0; c < split; c++) top = st[c * size + r * (hd + 2)] > top ? st[c * size + r * (hd + 2)] : top;
        for (int i = 0; i < hd; i += 16) _mm512_storeu_ps(out + r * hd + i, _mm512_setzero_ps());
        for (int c = 0; c < split; c++) {
            const float* s = st + c * size + r * (hd + 2);
            float w = expf(s[0] - top);  // an empty chunk: max -inf, weight 0
            total += w * s[1];
            for (int i = 0; i < hd; i += 16)
                _mm512_storeu_ps(out + r * hd + i, _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(s + 2 + i),
                                                                    _mm512_loadu_ps(out + r * hd + i)));
        }
        for (int i = 0; i < hd; i += 16)
            _mm512_storeu_ps(out + r * hd + i, _mm512_mul_ps(_mm512_loadu_ps(out + r * hd + i), _mm512_set1_ps(1.0f / total)));
    }
}

struct Matrix {              // packed operands of one matrix (backend/serving/q4_kernel.py `pack`)
    const uint8_t* w;
    const uint16_t* scales;
    int q8;                  // 0 = Q4_1, 1 = Q8_0
    int digits;              // int8 digits per input value: 2, or 1 (q4_kernel.cpp q4_matmul)
};

static int run(Matrix m, const float* x, int M, int K, int N, float* y, int threads) {
    return m.q8 ? matmul(Q8_TILES, 512, 16, x, M, K, m.w, m.scales, N, y, threads, m.digits)
                : matmul(Q4_TILES, 256, 32, x, M, K, m.w, m.scales, N, y, threads, m.digits);
}

// x [B, dim] float32, updated in place (the residual stream). cos/sin: [B, hd] rows, or one row shared
// (cs_stride 0). Cache k/v: [B, KV, slots, hd] float32 (decode_layer) or float16 (decode_layer_f16), or
// [B, KV, slots, hd + hd/16] int8 (decode_layer_q8, hd % 32 == 0); this token goes to slot pos; row b
// attends to slots start[b]..pos (start NULL: from 0).
template <typename kv_t>
static int decode_layer_impl(float* x, int B, int dim, float eps, const float* ln1, Matrix qkv, Matrix o,
                            const float* ln2, Matrix gate_up, Matrix down, int H, int KV, int hd, int hidden,
                            const float* cos, const float* sin, int cs_stride, kv_t* kc, kv_t* vc, int slots,
                            int pos, const int64_t* start, int threads) {
    const size_t ld = kv_ld<kv_t>(hd);
    if (dim % 32 || hidden % 32 || hd % 16 || H % KV || pos >= slots || (ld != (size_t)hd && (hd % 64 || hd > 256)))
        return 1;
    int nq = (H + 2 * KV) * hd, rep = H / KV;
    size_t floats = (size_t)B * (dim + nq + H * hd + 3 * hidden + dim);
    float* mem = (float*)malloc(floats * 4);
    if (!mem) return 2;
    float *h = mem, *qkv_out = h + (size_t)B * dim, *att = qkv_out + (size_t)B * nq,
          *gu = att + (size_t)B * H * hd, *act = gu + (size_t)B * 2 * hidden, *y = act + (size_t)B * hidden;
    int rc = 0;

    for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * dim, ln1, dim, eps, h + (size_t)b * dim);
    if ((rc = run(qkv, h, B, dim, nq, qkv_out, threads))) goto done;
    for (int b = 0; b < B; b++) {
        float* row = qkv_out + (size_t)b * nq;
        for (int j = 0; j < H + KV; j++) rope(row + j * hd, cos + (size_t)b * cs_stride, sin + (size_t)b * cs_stride, hd);
        for (int g = 0; g < KV; g++) {
            size_t slot = (((size_t)b * KV + g) * slots + pos) * ld;
            store_kv(kc + slot, row + (H + g) * hd, hd);
            store_kv(vc + slot, row + (H + KV + g) * hd, hd);
        }
    }
    {
        // Work items: each row's kv heads, their slots in chunks of ATTEND_CHUNK counted from the row's first
        // slot, the chunks' states merged after (flash-decoding), so a long context keeps every thread busy
        // even for one row. The chunks are fixed, not one a thread: a row's sums must not depend on the rows
        // beside it or on how many threads the step gets (batch invariance; the thread governor changes the
        // count under load). A row shorter than the longest gets empty chunks, which merge as exact zeros.
        int split = (pos + ATTEND_CHUNK) / ATTEND_CHUNK, items = B * KV;
        size_t size = (size_t)rep * (hd + 2);
        float* st = (float*)malloc((size_t)items * split * size * 4);
        if (!st) { rc = 2; goto done; }
        // round robin: a long row's chunks spread over the threads while a short padded row's are empty
        #pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int it = 0; it < items * split; it++) {
            int bg = it / split, c = it % split, b = bg / KV, g = bg % KV;
            int from = start ? (int)start[b] : 0, lo = from + c * ATTEND_CHUNK, hi = lo + ATTEND_CHUNK;
            size_t base = ((size_t)b * KV + g) * slots * ld;
            attend_range(qkv_out + (size_t)b * nq + g * rep * hd, rep, kc + base, vc + base, lo,
                         hi < pos + 1 ? hi : pos + 1, hd, st + (size_t)it * size);
        }
        for (int bg = 0; bg < items; bg++)
            attend_merge(st + (size_t)bg * split * size, split, rep, hd, att + (size_t)(bg / KV) * H * hd + (bg % KV) * rep * hd);
        free(st);
    }
    if (rc || (rc = run(o, att, B, H * hd, dim, y, threads))) goto done;
    for (size_t i = 0; i < (size_t)B * dim; i++) x[i] += y[i];

    for (int b = 0; b < B; b++) rms_norm(x + (size_t)b * dim, ln2, dim, eps, h + (size_t)b * dim);
    if ((rc = run(gate_up, h, B, dim, 2 * hidden, gu, threads))) goto done;
    for (int b = 0; b < B; b++)  // SwiGLU: silu(gate) * up
        for (int i = 0; i < hidden; i += 16) {
            __m512 g = _mm512_loadu_ps(gu + (size_t)b * 2 * hidden + i);
            __m512 u = _mm512_loadu_ps(gu + (size_t)b * 2 * hidden + hidden + i);
            __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_storeu_ps(act + (size_t)b * hidden + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), u));
        }
    if ((rc = run(down, act, B, hidden, dim, y, threads))) goto done;
    for (size_t i = 0; i < (size_t)B * dim; i++) x[i] += y[i];
done:
    free(mem);
    return rc;
}

#define DECODE_LAYER_ARGS(kv_t) float* x, int B, int dim, float eps, const float* ln1, Matrix qkv, Matrix o, \
    const float* ln2, Matrix gate_up, Matrix down, int H, int KV, int hd, int hidden, const float* cos, \
    const float* sin, int cs_stride, kv_t* kc, kv_t* vc, int slots, int pos, const int64_t* start, int threads
#define DECODE_LAYER_CALL x, B, dim, eps, ln1, qkv, o, ln2, gate_up, down, H, KV, hd, hidden, cos, sin, cs_stride, \
    kc, vc, slots, pos, start, threads
extern "C" int decode_layer(DECODE_LAYER_ARGS(float)) { return decode_layer_impl<float>(DECODE_LAYER_CALL); }
extern "C" int decode_layer_f16(DECODE_LAYER_ARGS(half_t)) { return decode_layer_impl<half_t>(DECODE_LAYER_CALL); }
extern "C" int decode_layer_q8(DECODE_LAYER_ARGS(q8_t)) { return decode_layer_impl<q8_t>(DECODE_LAYER_CALL); }
