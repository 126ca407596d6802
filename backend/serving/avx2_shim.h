// The AVX-512 intrinsics that q4_kernel.cpp and decode_layer.cpp use, for CPUs with AVX2, FMA and F16C only
// (most AMD CPUs before Zen 4, many Intel desktop ones): each 512-bit vector is a pair of 256-bit halves, and
// each intrinsic does to both halves what AVX-512 does to the whole. The kernels' sources stay as they are;
// backend/serving/q4_kernel.py builds them once with -mavx512vnni (this file unused) or with -mavx2 (this
// file included by q4_kernel.cpp), whichever the CPU runs.
//
// The integer dot products stay exact, so a row's result does not depend on the other rows in the call (the
// batch-invariance the scheduler relies on) and equals the AVX-512 build's integer sums; float reductions
// may add in another order than AVX-512's, by a rounding or so.
//
// vpdpbusd (u8 x s8, 4 products summed into an int32 lane, no saturation) has no AVX2 instruction.
// `vpmaddubsw` multiplies u8 x s8 but saturates its int16 pair sums (255 x 127 x 2 > 32767), so the u8
// operand is split into nibbles, each pair sum then within 15 x 128 x 2, and the nibbles' dots are combined
// in int32: dot(u, s) = 16 dot(u >> 4, s) + dot(u & 15, s) -- exact (llama.cpp's AVX2 path instead keeps
// the weights signed and moves the sign to the input, which suits its layout, not this one). The 4-bit
// weights' bytes are nibbles already: q4_kernel.cpp calls DPBUSD_U4 for them, one vpmaddubsw each.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

struct em512 { __m256 lo, hi; };
struct em512i { __m256i lo, hi; };

#define EM_F(op) static inline em512 em_##op(em512 a, em512 b) { return {_mm256_##op(a.lo, b.lo), _mm256_##op(a.hi, b.hi)}; }
EM_F(add_ps) EM_F(sub_ps) EM_F(mul_ps) EM_F(div_ps) EM_F(max_ps) EM_F(min_ps)
#undef EM_F
#define EM_I(op) static inline em512i em_##op(em512i a, em512i b) { return {_mm256_##op(a.lo, b.lo), _mm256_##op(a.hi, b.hi)}; }
EM_I(add_epi32) EM_I(sub_epi32) EM_I(min_epi32) EM_I(max_epi32) EM_I(and_si256)
#undef EM_I

static inline em512 em_fmadd_ps(em512 a, em512 b, em512 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
static inline em512 em_fnmadd_ps(em512 a, em512 b, em512 c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
static inline em512 em_set1_ps(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
static inline em512 em_setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline em512 em_loadu_ps(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void em_storeu_ps(float* p, em512 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
static inline em512 em_abs_ps(em512 a) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
static inline em512 em_cvtepi32_ps(em512i a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
static inline em512i em_cvtps_epi32(em512 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
static inline em512 em_cvtph_ps(__m256i h) {
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
#define em_cvtps_ph(a, r) _mm256_set_m128i(_mm256_cvtps_ph((a).hi, r), _mm256_cvtps_ph((a).lo, r))
#define em_roundscale_ps(a, r) (em512{_mm256_round_ps((a).lo, (r) | _MM_FROUND_NO_EXC), _mm256_round_ps((a).hi, (r) | _MM_FROUND_NO_EXC)})

static inline float em_hsum8(__m256 v) {  // the lanes' sum, halves first as AVX-512's reduce does
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline float em_hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
static inline float em_reduce_add_ps(em512 a) { return em_hsum8(_mm256_add_ps(a.lo, a.hi)); }
static inline float em_reduce_max_ps(em512 a) { return em_hmax8(_mm256_max_ps(a.lo, a.hi)); }
static inline int em_reduce_add_epi32(em512i a) {
    __m256i s = _mm256_add_epi32(a.lo, a.hi);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}

// masks: bit j of a __mmask16 is lane j (lanes 0-7 in lo, 8-15 in hi)
static inline em512 em_lanes(__mmask16 k) {
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i lo = _mm256_set1_epi32(k & 0xFF), hi = _mm256_set1_epi32(k >> 8);
    return {_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(lo, bit), bit)),
            _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(hi, bit), bit))};
}
static inline em512 em_maskz_mov_ps(__mmask16 k, em512 a) {
    em512 m = em_lanes(k);
    return {_mm256_and_ps(a.lo, m.lo), _mm256_and_ps(a.hi, m.hi)};
}
static inline float em_mask_reduce_max_ps(__mmask16 k, em512 a) {
    em512 m = em_lanes(k);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    return em_reduce_max_ps({_mm256_blendv_ps(ninf, a.lo, m.lo), _mm256_blendv_ps(ninf, a.hi, m.hi)});
}

// a * 2^n for integer-valued n in [-254, 254]: two exact powers of two (each a normal float), so a result
// below float32's normal range rounds once, as vscalefps does
static inline __m256 em_pow2(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline __m256 em_scalef8(__m256 a, __m256 n) {
    __m256 n1 = _mm256_floor_ps(_mm256_mul_ps(n, _mm256_set1_ps(0.5f)));
    return _mm256_mul_ps(_mm256_mul_ps(a, em_pow2(n1)), em_pow2(_mm256_sub_ps(n, n1)));
}
static inline em512 em_scalef_ps(em512 a, em512 n) { return {em_scalef8(a.lo, n.lo), em_scalef8(a.hi, n.hi)}; }

// shuffles: within 128-bit lanes (shuffle_ps), of 128-bit lanes (shuffle_f32x4), of all 16 lanes (permutexvar)
#define em_shuffle_ps(a, b, imm) (em512{_mm256_shuffle_ps((a).lo, (b).lo, imm), _mm256_shuffle_ps((a).hi, (b).hi, imm)})
static inline __m128 em_lane128(em512 a, int i) {
    __m256 h = i < 2 ? a.lo : a.hi;
    return (i & 1) ? _mm256_extractf128_ps(h, 1) : _mm256_castps256_ps128(h);
}
static inline em512 em_shuffle_f32x4(em512 a, em512 b, int imm) {
    return {_mm256_set_m128(em_lane128(a, (imm >> 2) & 3), em_lane128(a, imm & 3)),
            _mm256_set_m128(em_lane128(b, (imm >> 6) & 3), em_lane128(b, (imm >> 4) & 3))};
}
static inline em512 em_permutexvar_ps(em512i idx, em512 a) {
    const __m256i seven = _mm256_set1_epi32(7);
    em512 r;
    __m256i ix[2] = {idx.lo, idx.hi};
    __m256* out[2] = {&r.lo, &r.hi};
    for (int h = 0; h < 2; h++) {
        __m256 from_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_and_si256(ix[h], _mm256_set1_epi32(15)), seven));
        __m256i lane = _mm256_and_si256(ix[h], seven);
        *out[h] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(a.lo, lane), _mm256_permutevar8x32_ps(a.hi, lane), from_hi);
    }
    return r;
}

// integers
static inline em512i em_set1_epi32(int v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
static inline em512i em_set1_epi8(char v) { return {_mm256_set1_epi8(v), _mm256_set1_epi8(v)}; }
static inline em512i em_setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline em512i em_setr_epi32(int a, int b, int c, int d, int e, int f, int g, int h, int i, int j, int k,
                                   int l, int m, int n, int o, int p) {
    return {_mm256_setr_epi32(a, b, c, d, e, f, g, h), _mm256_setr_epi32(i, j, k, l, m, n, o, p)};
}
static inline em512i em_loadu_si512(const void* p) {
    return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)p + 1)};
}
static inline em512i em_srli_epi16(em512i a, int n) {
    __m128i c = _mm_cvtsi32_si128(n);
    return {_mm256_srl_epi16(a.lo, c), _mm256_srl_epi16(a.hi, c)};
}
static inline em512i em_slli_epi32(em512i a, int n) {
    __m128i c = _mm_cvtsi32_si128(n);
    return {_mm256_sll_epi32(a.lo, c), _mm256_sll_epi32(a.hi, c)};
}
static inline __m128i em_cvtepi32_epi8(em512i a) {  // vpmovdb: each lane's low byte
    alignas(32) int32_t v[16];
    _mm256_store_si256((__m256i*)v, a.lo);
    _mm256_store_si256((__m256i*)(v + 8), a.hi);
    alignas(16) int8_t b[16];
    for (int i = 0; i < 16; i++) b[i] = (int8_t)v[i];
    return _mm_load_si128((const __m128i*)b);
}
static inline __m256i em_dpbusd8(__m256i acc, __m256i u, __m256i s) {  // see the header: exact, via nibbles
    const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(u, low4), s), ones);
    __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), low4), s), ones);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_slli_epi32(hi, 4), lo));
}
static inline em512i em_dpbusd_epi32(em512i acc, em512i u, em512i s) {
    return {em_dpbusd8(acc.lo, u.lo, s.lo), em_dpbusd8(acc.hi, u.hi, s.hi)};
}
// u's bytes < 16 (4-bit weights): vpmaddubsw's pair sums stay within 15 x 128 x 2, one multiply suffices
static inline __m256i em_dpbusd8_u4(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
static inline em512i em_dpbusd_u4(em512i acc, em512i u, em512i s) {
    return {em_dpbusd8_u4(acc.lo, u.lo, s.lo), em_dpbusd8_u4(acc.hi, u.hi, s.hi)};
}
#define DPBUSD_U4 em_dpbusd_u4

// Q8_0 weights are packed as u = q + 128 (vpdpbusd's unsigned operand; the kernel subtracts 128 sum(x) after).
// Here the weights go back to signed q = u ^ 0x80 and their sign moves onto x (llama.cpp's AVX2 trick):
// dot(q, x) = dot(|q|, sign(x, q)), pair sums within 128 x 127 x 2, so one vpmaddubsw, and no correction.
struct Q8Signed { em512i mag, q; };
static inline Q8Signed q8_signed(em512i u) {
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    __m256i lo = _mm256_xor_si256(u.lo, bias), hi = _mm256_xor_si256(u.hi, bias);
    return {{_mm256_abs_epi8(lo), _mm256_abs_epi8(hi)}, {lo, hi}};
}
static inline __m256i q8_signed_dot8(__m256i acc, __m256i mag, __m256i q, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(s, q)), _mm256_set1_epi16(1)));
}
static inline em512i q8_signed_dot(em512i acc, Q8Signed w, em512i s) {
    return {q8_signed_dot8(acc.lo, w.mag.lo, w.q.lo, s.lo), q8_signed_dot8(acc.hi, w.mag.hi, w.q.hi, s.hi)};
}
#define Q8_SIGNED_DOT 1

// 4 rows of x per pass over a weight tile, not 8: AVX2 has 16 vector registers, not 32, and 8 rows' accumulators
// (2 digits x 2 halves each) spill. Measured on an AVX2 EPYC, 2 threads, 8 rows: the lm_head (Q8_0, 49152 x 576)
// 8.4 ms at 4 rows a pass vs 9.3 at 8; a 3072 x 576 Q4_1 matrix 0.39 vs 0.55 ms.
#define KERNEL_ROWS 4

// the names the kernels use (some are macros in GCC's headers, hence the #undef)
#undef __m512
#define __m512 em512
#undef __m512i
#define __m512i em512i
#undef _mm512_add_ps
#define _mm512_add_ps em_add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps em_sub_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps em_mul_ps
#undef _mm512_div_ps
#define _mm512_div_ps em_div_ps
#undef _mm512_max_ps
#define _mm512_max_ps em_max_ps
#undef _mm512_min_ps
#define _mm512_min_ps em_min_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps em_fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps em_fnmadd_ps
#undef _mm512_set1_ps
#define _mm512_set1_ps em_set1_ps
#undef _mm512_setzero_ps
#define _mm512_setzero_ps em_setzero_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps em_loadu_ps
#undef _mm512_storeu_ps
#define _mm512_storeu_ps em_storeu_ps
#undef _mm512_store_ps
#define _mm512_store_ps em_storeu_ps
#undef _mm512_abs_ps
#define _mm512_abs_ps em_abs_ps
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps em_cvtepi32_ps
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32 em_cvtps_epi32
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps em_cvtph_ps
#undef _mm512_cvtps_ph
#define _mm512_cvtps_ph em_cvtps_ph
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps em_roundscale_ps
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps em_reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps em_reduce_max_ps
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32 em_reduce_add_epi32
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps em_maskz_mov_ps
#undef _mm512_mask_reduce_max_ps
#define _mm512_mask_reduce_max_ps em_mask_reduce_max_ps
#undef _mm512_scalef_ps
#define _mm512_scalef_ps em_scalef_ps
#undef _mm512_shuffle_ps
#define _mm512_shuffle_ps em_shuffle_ps
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4 em_shuffle_f32x4
#undef _mm512_permutexvar_ps
#define _mm512_permutexvar_ps em_permutexvar_ps
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 em_set1_epi32
#undef _mm512_set1_epi8
#define _mm512_set1_epi8 em_set1_epi8
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 em_setzero_si512
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 em_setr_epi32
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 em_loadu_si512
#undef _mm512_and_si512
#define _mm512_and_si512 em_and_si256
#undef _mm512_add_epi32
#define _mm512_add_epi32 em_add_epi32
#undef _mm512_sub_epi32
#define _mm512_sub_epi32 em_sub_epi32
#undef _mm512_min_epi32
#define _mm512_min_epi32 em_min_epi32
#undef _mm512_max_epi32
#define _mm512_max_epi32 em_max_epi32
#undef _mm512_srli_epi16
#define _mm512_srli_epi16 em_srli_epi16
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 em_slli_epi32
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8 em_cvtepi32_epi8
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 em_dpbusd_epi32
