/* 4-bit blockwise dequantization for CPU tensors (loraforge.quant._native loads this).

   out[i] = code[q_i] * absmax[i / bs], rounded once to the output type, for whole blocks only;
   q_{2j} is the high nibble of packed[j], q_{2j+1} the low one (bitsandbytes' layout).
   The same arithmetic as the PyTorch path in nf4.py: one fp32 multiply per element, then
   round-to-nearest-even to bf16/fp16, so both paths give identical bits.

   Compiled at first use with the machine's C compiler (-O3 -march=native); with AVX-512 a 16-entry
   code table is one register and one vpermps looks up 16 nibbles. Without it, a plain loop.

   Each entry point is given the length of every buffer it reads or writes and checks, before
   touching any, that the requested range fits them all; otherwise it returns a nonzero LF_E_* code
   (the caller raises an exception) and writes nothing. The inner loops then need no checks:
   nibbles index 16 code values and bytes 256. */

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { OUT_F32 = 0, OUT_BF16 = 1, OUT_F16 = 2 };

/* Error codes (the Python side in _native.py maps them to messages) */
enum {
    LF_OK = 0,
    LF_E_CODE = 1,      /* the code table is shorter than 16 (4-bit) or 256 (8-bit) values */
    LF_E_BLOCKSIZE = 2, /* the block size is not a positive (and, for 4-bit, even) number */
    LF_E_OUT_TYPE = 3,  /* unknown output type */
    LF_E_RANGE = 4,     /* the block / element range is negative or reversed */
    LF_E_ABSMAX = 5,    /* the range needs more block scales (or 8-bit indices) than given */
    LF_E_PACKED = 6,    /* the range needs more packed bytes than given */
    LF_E_OUT = 7,       /* the range needs a longer output than given */
    LF_E_NESTED = 8,    /* the range needs more nested scales than given */
};

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* to nearest even */
    return (uint16_t)(u >> 16);
}

static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    /* round to nearest even, with subnormals, overflow to inf, NaN kept */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (ax < 0x38800000u) {                                   /* fp16 subnormal or zero */
        if (ax < 0x33000000u) return (uint16_t)sign;
        uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(ax >> 23); /* value = m * 2^(e-150), in units of 2^-24 */
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = ax - 0x38000000u; /* rebias exponent 127 -> 15 */
    uint32_t rem = r & 0x1fffu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
#endif
}

#if defined(__AVX512F__)
/* A 64-byte store; streaming (non-temporal) ones skip reading the destination line into the cache
   first, which halves the memory traffic of a large output (measured 10.7 -> 3.4 ms for 64 MB). */
static inline void store512(void *dst, __m512i v, int stream) {
    if (stream)
        _mm512_stream_si512((__m512i *)dst, v);
    else
        _mm512_storeu_si512(dst, v);
}
#endif

/* Blocks [b0, b1) of bs elements (bs even, a power of two >= 32). `stream`: write with
   non-temporal stores (for outputs much larger than the caches; `out` must be 64-byte aligned).
   Buffer lengths in elements: packed_len bytes, absmax_len and code_len floats, out_len outputs.
   Returns LF_OK, or an LF_E_* code without writing anything. (Comparisons by division: no
   product of untrusted sizes can overflow.) */
int32_t lf_dequantize_4bit(const uint8_t *packed, int64_t packed_len, const float *absmax, int64_t absmax_len,
                           const float *code, int64_t code_len, void *out, int64_t out_len,
                           int64_t b0, int64_t b1, int64_t bs, int32_t out_type, int32_t stream) {
    if (code_len < 16) return LF_E_CODE;
    if (bs < 2 || bs % 2 != 0) return LF_E_BLOCKSIZE;
    if (out_type != OUT_F32 && out_type != OUT_BF16 && out_type != OUT_F16) return LF_E_OUT_TYPE;
    if (b0 < 0 || b1 < b0) return LF_E_RANGE;
    if (b1 > absmax_len) return LF_E_ABSMAX;
    if (packed_len < 0 || b1 > packed_len / (bs / 2)) return LF_E_PACKED;
    if (out_len < 0 || b1 > out_len / bs) return LF_E_OUT;
    if (((uintptr_t)out & 63) != 0) stream = 0;
    float pair_hi[256], pair_lo[256];
    for (int v = 0; v < 256; v++) {
        pair_hi[v] = code[v >> 4];
        pair_lo[v] = code[v & 15];
    }
#if defined(__AVX512F__)
    const __m512 table = _mm512_loadu_ps(code);
    const __m512i take_first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i take_second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i low4 = _mm512_set1_epi32(15);
#endif
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *src = packed + b * (bs / 2);
        const float scale = absmax[b];
        int64_t e = b * bs; /* first output element of the block */
        int64_t j = 0;      /* bytes of the block done */
#if defined(__AVX512F__)
        const __m512 s = _mm512_set1_ps(scale);
        for (; j + 16 <= bs / 2; j += 16, e += 32) {
            __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + j)));
            __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), s);
            __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), table), s);
            __m512 first = _mm512_permutex2var_ps(hi, take_first, lo);   /* hi0 lo0 hi1 lo1 ... */
            __m512 second = _mm512_permutex2var_ps(hi, take_second, lo); /* hi8 lo8 ... */
            if (out_type == OUT_F32) {
                store512((float *)out + e, _mm512_castps_si512(first), stream);
                store512((float *)out + e + 16, _mm512_castps_si512(second), stream);
            } else if (out_type == OUT_F16) {
                __m256i h1 = _mm512_cvtps_ph(first, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m256i h2 = _mm512_cvtps_ph(second, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                store512((uint16_t *)out + e, _mm512_inserti64x4(_mm512_castsi256_si512(h1), h2, 1), stream);
            } else {
#if defined(__AVX512BF16__)
                store512((uint16_t *)out + e, (__m512i)_mm512_cvtne2ps_pbh(second, first), stream);
#else
                /* round to nearest even on the bits (inputs are finite: code x absmax) */
                __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
                __m512i u1 = _mm512_castps_si512(first), u2 = _mm512_castps_si512(second);
                u1 = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u1, bias),
                                                        _mm512_and_si512(_mm512_srli_epi32(u1, 16), one)), 16);
                u2 = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u2, bias),
                                                        _mm512_and_si512(_mm512_srli_epi32(u2, 16), one)), 16);
                __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(u1)),
                                                  _mm512_cvtepi32_epi16(u2), 1);
                store512((uint16_t *)out + e, both, stream);
#endif
            }
        }
#endif
        for (; j < bs / 2; j++, e += 2) {
            float h = pair_hi[src[j]] * scale, l = pair_lo[src[j]] * scale;
            if (out_type == OUT_F32) {
                ((float *)out)[e] = h;
                ((float *)out)[e + 1] = l;
            } else if (out_type == OUT_BF16) {
                ((uint16_t *)out)[e] = f32_to_bf16(h);
                ((uint16_t *)out)[e + 1] = f32_to_bf16(l);
            } else {
                ((uint16_t *)out)[e] = f32_to_f16(h);
                ((uint16_t *)out)[e + 1] = f32_to_f16(l);
            }
        }
    }
#if defined(__AVX512F__)
    if (stream) _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
#endif
    return LF_OK;
}

/* Double-quantized block scales: absmax[i] = code[q[i]] * nested[i / nested_bs] + offset, for
   i in [i0, i1): a product rounded to fp32, then a sum rounded to fp32 (no FMA: the build passes
   -ffp-contract=off), as bitsandbytes and the PyTorch path compute it. Lengths in elements:
   q_len indices, code_len and nested_len floats, absmax_len outputs. Returns LF_OK, or an LF_E_*
   code without writing anything. */
int32_t lf_dequantize_absmax(const uint8_t *q, int64_t q_len, const float *code, int64_t code_len,
                             const float *nested, int64_t nested_len, float offset, float *absmax,
                             int64_t absmax_len, int64_t i0, int64_t i1, int64_t nested_bs) {
    if (code_len < 256) return LF_E_CODE;
    if (nested_bs < 1) return LF_E_BLOCKSIZE;
    if (i0 < 0 || i1 < i0) return LF_E_RANGE;
    if (i1 > q_len) return LF_E_ABSMAX;
    if (i1 > absmax_len) return LF_E_OUT;
    if (i1 > i0 && (i1 - 1) / nested_bs >= nested_len) return LF_E_NESTED;
    if (i1 == i0) return LF_OK;
    for (int64_t b = i0 / nested_bs; b <= (i1 - 1) / nested_bs; b++) {
        const float scale = nested[b];
        const int64_t start = b * nested_bs; /* <= i1 - 1: no overflow */
        int64_t lo = start > i0 ? start : i0;
        int64_t hi = i1 - start > nested_bs ? start + nested_bs : i1;
        for (int64_t i = lo; i < hi; i++) {
            float product = code[q[i]] * scale;
            absmax[i] = product + offset;
        }
    }
    return LF_OK;
}
