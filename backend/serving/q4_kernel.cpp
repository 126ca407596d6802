// Block-quantized matmul for decoding on x86 CPUs with AVX512-VNNI: y[M, N] = x[M, K] @ W.T, where W
// stays in the GGUF's own blocks of 32 along K (Q4_1: w = q * d + m, q in 0..15; Q8_0: w = q * d).
//
// x is quantized per block of 32 to two int8 digits, x ~ (xq + xq2 / 256) * dx with dx = max|x| / 127,
// so a block's dot product is integer: `vpdpbusd` sums 4 u8 x s8 products per int32 lane, 64 per
// instruction, and the two digits' dots combine exactly in int32 as 256 * dot(q, xq) + dot(q, xq2):
//     Q4_1: y += d * dx / 256 * dot(q, 256 xq + xq2) + m * sum(x)                  (sum(x) float32)
//     Q8_0: y += d * dx / 256 * (dot(q + 128, 256 xq + xq2) - 128 * sum(256 xq + xq2))  (q + 128: unsigned)
// Why two digits: llama.cpp keeps one (8 bits a value; a block loses its small values beside a large
// one). On SmolLM2 one digit measured 96% same top-1 as float32 (max |logit diff| 2.7), two 100% (0.01),
// for 1.5x the multiply-adds at 8 rows and the same time at 1 row, where reading the weights sets the pace.
//
// Lanes are 16 output rows n; a weight vector holds 16 n x 4 k. A weight vector is loaded once for up
// to ROWS rows of x (torch's `_weight_int4pack_mm_for_cpu` dequantizes again for every 4 rows, so 8 rows
// cost it ~3.5x one row). Packing: backend/serving/q4_kernel.py `pack`.
#include <float.h>
#if defined(__AVX512VNNI__)
#include <immintrin.h>
#else
#include "avx2_shim.h"  // CPUs with AVX2 only: the same code, each 512-bit vector as two 256-bit halves
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef KERNEL_ROWS
#define KERNEL_ROWS 8
#endif
enum { ROWS = KERNEL_ROWS };  // rows of x per pass over a weight tile: 2 accumulators + 1 total each, 24 of 32 zmm

struct Xq {               // x quantized, per group of ROWS rows, quad-major: a tile reads a row's 4 inputs
    const int32_t* q;     // [K/4][ROWS]: xq[k..k+3] of each row as one int32
    const int32_t* q2;    // the same for the second digit
    const float* scale;   // [ROWS][KB]: dx / 256
    const float* sum;     // [ROWS][KB]: sum(x) (Q4_1)
    const int32_t* corr;  // [ROWS][KB]: 128 * sum(256 xq + xq2) (Q8_0)
};

#ifndef DPBUSD_U4  // vpdpbusd where the unsigned operand's bytes are < 16 (4-bit weights); the AVX2 shim has
#define DPBUSD_U4 _mm512_dpbusd_epi32  // a cheaper exact form for those
#endif

// acc, acc2 += the dots (by `dp`) of weight vector w with row r's quad i: first and second digit
// (D == 1: x has one digit, the second is zero and not multiplied)
#define DOT(dp, w, i, r) do { \
        acc[r] = dp(acc[r], w, _mm512_set1_epi32(x.q[(i) * ROWS + (r)])); \
        if (D == 2) acc2[r] = dp(acc2[r], w, _mm512_set1_epi32(x.q2[(i) * ROWS + (r)])); \
    } while (0)

static inline __m512i combine(__m512i acc, __m512i acc2) {  // 256 acc + acc2, exact: |256 acc| < 2^31
    return _mm512_add_epi32(_mm512_slli_epi32(acc, 8), acc2);
}

// Q4_1 tile (16 rows n): per block 4 vectors of 64 bytes; byte 4i+c of vector v holds q[n=i, k=8v+c] in
// its low nibble and q[i, 8v+4+c] in its high nibble. scales: [KB][d x 16, m x 16] fp16.
template <int MR, int D>
static void q4_tile(Xq x, int KB, const uint8_t* w, const uint16_t* dm, float* y, int N) {
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 tot[MR];
    for (int r = 0; r < MR; r++) tot[r] = _mm512_setzero_ps();
    for (int b = 0; b < KB; b++, w += 256, dm += 32, x.q += 8 * ROWS, x.q2 += 8 * ROWS) {
        __m512i acc[MR], acc2[MR];
        for (int r = 0; r < MR; r++) acc[r] = acc2[r] = _mm512_setzero_si512();
        for (int v = 0; v < 4; v++) {
            __m512i raw = _mm512_loadu_si512(w + 64 * v);
            __m512i lo = _mm512_and_si512(raw, low4), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
            for (int r = 0; r < MR; r++) {
                DOT(DPBUSD_U4, lo, 2 * v, r);
                DOT(DPBUSD_U4, hi, 2 * v + 1, r);
            }
        }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)dm));
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(dm + 16)));
        for (int r = 0; r < MR; r++)
            tot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(combine(acc[r], acc2[r])),
                                     _mm512_mul_ps(d, _mm512_set1_ps(x.scale[r * KB + b])),
                                     _mm512_fmadd_ps(m, _mm512_set1_ps(x.sum[r * KB + b]), tot[r]));
    }
    for (int r = 0; r < MR; r++) _mm512_storeu_ps(y + (size_t)r * N, tot[r]);
}

// Q8_0 tile: per block 8 vectors of 64 bytes; byte 4i+c of vector v holds q[n=i, k=4v+c] + 128.
// scales: [KB][d x 16] fp16.
template <int MR, int D>
static void q8_tile(Xq x, int KB, const uint8_t* w, const uint16_t* dm, float* y, int N) {
    __m512 tot[MR];
    for (int r = 0; r < MR; r++) tot[r] = _mm512_setzero_ps();
    for (int b = 0; b < KB; b++, w += 512, dm += 16, x.q += 8 * ROWS, x.q2 += 8 * ROWS) {
        __m512i acc[MR], acc2[MR];
        for (int r = 0; r < MR; r++) acc[r] = acc2[r] = _mm512_setzero_si512();
        for (int v = 0; v < 8; v++) {
            __m512i q = _mm512_loadu_si512(w + 64 * v);
#ifdef Q8_SIGNED_DOT  // the AVX2 shim: dot(q - 128, x) directly, so no correction below
            Q8Signed qs = q8_signed(q);
            for (int r = 0; r < MR; r++) {
                acc[r] = q8_signed_dot(acc[r], qs, _mm512_set1_epi32(x.q[v * ROWS + r]));
                if (D == 2) acc2[r] = q8_signed_dot(acc2[r], qs, _mm512_set1_epi32(x.q2[v * ROWS + r]));
            }
#else
            for (int r = 0; r < MR; r++) DOT(_mm512_dpbusd_epi32, q, v, r);
#endif
        }
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)dm));
        for (int r = 0; r < MR; r++) {
#ifdef Q8_SIGNED_DOT
            __m512i dot = combine(acc[r], acc2[r]);
#else
            __m512i dot = _mm512_sub_epi32(combine(acc[r], acc2[r]), _mm512_set1_epi32(x.corr[r * KB + b]));
#endif
            tot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(x.scale[r * KB + b])),
                                     tot[r]);
        }
    }
    for (int r = 0; r < MR; r++) _mm512_storeu_ps(y + (size_t)r * N, tot[r]);
}

typedef void (*tile_fn)(Xq, int, const uint8_t*, const uint16_t*, float*, int);

#define TILE_ROW(name, D) {name<1, D>, name<2, D>, name<3, D>, name<4, D>, name<5, D>, name<6, D>, name<7, D>, name<8, D>}
#define TILE_TABLE(name) {TILE_ROW(name, 1), TILE_ROW(name, 2)}
static const tile_fn Q4_TILES[2][8] = TILE_TABLE(q4_tile);  // [digits - 1][rows - 1]; the first ROWS are used
static const tile_fn Q8_TILES[2][8] = TILE_TABLE(q8_tile);

static inline __m512i clamp127(__m512i v) {
    return _mm512_min_epi32(_mm512_set1_epi32(127), _mm512_max_epi32(_mm512_set1_epi32(-127), v));
}

// x float32 [M, K] -> per block of 32: xq = round(x / dx) in -127..127 with dx = max|x| / 127 (0 for a
// zero block), xq2 = round(256 (x / dx - xq)) clamped to -127..127, dx / 256, sum(x), the Q8_0 correction.
// digits 1: xq2 = 0, x rounded to one int8 per value as llama.cpp's q8 activations are (half the multiplies;
// the kernel then skips the second digit's dots).
static void quantize(const float* x, int M, int K, int32_t* xq, int32_t* xq2, float* scale, float* sum,
                     int32_t* corr, int digits) {
    int KB = K / 32;
    const __m512 k256 = _mm512_set1_ps(256.0f);
    for (int r = 0; r < M; r++) {
        size_t q_at = (size_t)(r / ROWS) * (K / 4) * ROWS + r % ROWS;
        size_t s_at = (size_t)(r / ROWS) * ROWS * KB + (r % ROWS) * KB;
        for (int b = 0; b < KB; b++) {
            const float* s = x + (size_t)r * K + b * 32;
            __m512 a = _mm512_loadu_ps(s), c = _mm512_loadu_ps(s + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
            // below FLT_MIN, 127 / amax overflows: such a block counts as zero (its part of y is < 1e-36)
            __m512 inv = _mm512_set1_ps(amax >= FLT_MIN ? 127.0f / amax : 0.0f);
            __m512 va = _mm512_mul_ps(a, inv), vc = _mm512_mul_ps(c, inv);
            __m512i ia = _mm512_cvtps_epi32(va), ic = _mm512_cvtps_epi32(vc);  // round to nearest even
            __m512i ra = _mm512_setzero_si512(), rc = _mm512_setzero_si512();
            if (digits == 2) {
                ra = clamp127(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(va, _mm512_cvtepi32_ps(ia)), k256)));
                rc = clamp127(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(vc, _mm512_cvtepi32_ps(ic)), k256)));
            }
            alignas(64) int8_t digits[2][32];
            _mm_store_si128((__m128i*)digits[0], _mm512_cvtepi32_epi8(ia));
            _mm_store_si128((__m128i*)(digits[0] + 16), _mm512_cvtepi32_epi8(ic));
            _mm_store_si128((__m128i*)digits[1], _mm512_cvtepi32_epi8(ra));
            _mm_store_si128((__m128i*)(digits[1] + 16), _mm512_cvtepi32_epi8(rc));
            for (int quad = 0; quad < 8; quad++) {
                memcpy(xq + q_at + (size_t)(b * 8 + quad) * ROWS, digits[0] + 4 * quad, 4);
                memcpy(xq2 + q_at + (size_t)(b * 8 + quad) * ROWS, digits[1] + 4 * quad, 4);
            }
            sum[s_at + b] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
            // max ignores NaN, so a NaN or inf input shows only in the sum: make the block's part NaN, as float would
            scale[s_at + b] = isfinite(sum[s_at + b]) ? amax / 127.0f / 256.0f : NAN;
            corr[s_at + b] = 128 * (256 * _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ic))
                                    + _mm512_reduce_add_epi32(_mm512_add_epi32(ra, rc)));
        }
    }
}

static int matmul(const tile_fn (*table)[8], size_t tile_bytes, size_t tile_scales, const float* x, int M, int K,
                  const uint8_t* w, const uint16_t* dm, int N, float* y, int threads, int digits) {
    if (M <= 0 || K % 32 || N % 16 || (digits != 1 && digits != 2)) return 1;
    const tile_fn* tiles = table[digits - 1];
    int KB = K / 32, NT = N / 16, groups = (M + ROWS - 1) / ROWS;
    size_t padded = (size_t)groups * ROWS, nq = padded * K / 4, ns = padded * KB;
    int32_t* ints = (int32_t*)calloc(2 * nq + ns, 4);  // xq, xq2, corr
    float* floats = (float*)calloc(2 * ns, 4);          // scale, sum
    if (!ints || !floats) { free(ints); free(floats); return 2; }
    int32_t *xq = ints, *xq2 = ints + nq, *corr = ints + 2 * nq;
    float *scale = floats, *sum = floats + ns;
    quantize(x, M, K, xq, xq2, scale, sum, corr, digits);
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < NT; t++)
        for (int g = 0; g < groups; g++) {
            int mr = M - g * ROWS < ROWS ? M - g * ROWS : ROWS;
            size_t qo = (size_t)g * ROWS * K / 4, so = (size_t)g * ROWS * KB;
            Xq xg = {xq + qo, xq2 + qo, scale + so, sum + so, corr + so};
            tiles[mr - 1](xg, KB, w + t * tile_bytes * KB, dm + t * tile_scales * KB, y + (size_t)g * ROWS * N + 16 * t, N);
        }
    free(ints);
    free(floats);
    return 0;
}

// digits: 2 = x as two int8 digits per value (~15 bits: errors of 2-5e-5 of the largest output, measured in
// tests/test_q4_kernel.py), 1 = one (llama.cpp's q8 activations: half the multiplies, 3-9e-3)
extern "C" int q4_matmul(const float* x, int M, int K, const uint8_t* w, const uint16_t* dm, int N, float* y,
                         int threads, int digits) {
    return matmul(Q4_TILES, 256, 32, x, M, K, w, dm, N, y, threads, digits);
}

extern "C" int q8_matmul(const float* x, int M, int K, const uint8_t* w, const uint16_t* dm, int N, float* y,
                         int threads, int digits) {
    return matmul(Q8_TILES, 512, 16, x, M, K, w, dm, N, y, threads, digits);
}

// The ceiling of the kernels' inner product on this CPU: `rounds` rounds of 8 independent DPBUSD_U4 chains
// (64 u8 x s8 multiply-adds each, the 4-bit weights' form: vpdpbusd, or on AVX2 vpmaddubsw + vpmaddwd +
// vpaddd per half) on each of `threads` threads, no memory traffic. backend/bench/decode.py times it: no
// kernel built on these instructions multiplies faster here (real ones also unpack nibbles, load, scale).
// Returns a sum of the accumulators so that the work cannot be optimised away.
extern "C" long long peak_dpbusd_u4(int threads, long long rounds) {
    long long sink = 0;
    #pragma omp parallel num_threads(threads) reduction(+:sink)
    {
        __m512i u = _mm512_set1_epi8(7), s = _mm512_set1_epi8(3), acc[8];
        for (int k = 0; k < 8; k++) acc[k] = _mm512_setzero_si512();
        for (long long i = 0; i < rounds; i++) {
#ifdef __AVX512F__
            asm volatile("" : "+v"(u), "+v"(s));  // opaque to the compiler: every round multiplies anew
#else
            asm volatile("" : "+x"(u.lo), "+x"(u.hi), "+x"(s.lo), "+x"(s.hi));
#endif
            for (int k = 0; k < 8; k++) acc[k] = DPBUSD_U4(acc[k], u, s);
        }
        for (int k = 0; k < 8; k++) sink += _mm512_reduce_add_epi32(acc[k]);
    }
    return sink;
}
