/* The philox-ieee direction generator on CPU: Philox4x32-10 counters and a Box-Muller
 * transform written in IEEE basic operations only (+, -, *, /, sqrt, integer ops), so its
 * values equal the torch-ops reference in zo/philox_ieee.py bit for bit on any machine.
 *
 * Build flags matter for that: -ffp-contract=off (no fused multiply-add, which rounds once
 * where the reference rounds twice) and no -ffast-math (no reassociation). Vectorisation
 * does not change a value: every loop is element-wise.
 *
 * Element j of tensor `index` at step seed `seed` is lane j % 4 of Philox4x32-10 with key
 * (seed low, seed high) and counter (j / 4 low, j / 4 high, index, 0).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ABI_VERSION 2
#define TILE 64 /* counters per tile: 256 values; larger tiles measured 20-25% slower */
#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u
#define ROUNDS 10

int zo_abi_version(void) { return ABI_VERSION; }

/* Whether the passes below run on OpenMP threads (built with -fopenmp). */
int zo_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Set the calling thread's OpenMP thread count in the runtime this library is bound to and
 * return the previous one: the loader sets a count and asks torch, to learn whether that
 * runtime is torch's own (one thread pool, not two competing for the cores). */
int zo_openmp_set_threads(int threads) {
#ifdef _OPENMP
    int before = omp_get_max_threads();
    omp_set_num_threads(threads);
    return before;
#else
    (void)threads;
    return 0;
#endif
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* hi and lo words of a * m for 16 lanes: even lanes' 64-bit products directly, odd lanes'
 * after shifting them down (what a plain loop compiles to, with fewer shuffles). */
static inline void mul_hi_lo(__m512i a, __m512i m, __m512i *hi, __m512i *lo) {
    __m512i even = _mm512_mul_epu32(a, m);
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#endif

static void philox_words(uint64_t first, int count, uint32_t index, uint64_t seed,
                         uint32_t *restrict w0, uint32_t *restrict w1,
                         uint32_t *restrict w2, uint32_t *restrict w3) {
    uint32_t key0[ROUNDS], key1[ROUNDS];
    key0[0] = (uint32_t)seed;
    key1[0] = (uint32_t)(seed >> 32);
    for (int r = 1; r < ROUNDS; r++) {
        key0[r] = key0[r - 1] + W0;
        key1[r] = key1[r - 1] + W1;
    }
    int i = 0;
#if defined(__AVX512F__)
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i m0 = _mm512_set1_epi32((int)M0), m1 = _mm512_set1_epi32((int)M1);
    for (; i + 16 <= count; i += 16) {
        uint64_t base = first + (uint64_t)i;
        /* the 16 counters share their high word unless the low word wraps inside them */
        if ((uint32_t)base > 0xFFFFFFFFu - 15u) break;
        __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)base), lanes);
        __m512i c1 = _mm512_set1_epi32((int)(uint32_t)(base >> 32));
        __m512i c2 = _mm512_set1_epi32((int)index);
        __m512i c3 = _mm512_setzero_si512();
        for (int r = 0; r < ROUNDS; r++) {
            __m512i hi0, lo0, hi1, lo1;
            mul_hi_lo(c0, m0, &hi0, &lo0);
            mul_hi_lo(c2, m1, &hi1, &lo1);
            c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32((int)key0[r]));
            c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32((int)key1[r]));
            c1 = lo1;
            c3 = lo0;
        }
        _mm512_storeu_si512((void *)(w0 + i), c0);
        _mm512_storeu_si512((void *)(w1 + i), c1);
        _mm512_storeu_si512((void *)(w2 + i), c2);
        _mm512_storeu_si512((void *)(w3 + i), c3);
    }
#endif
    for (; i < count; i++) { /* the definition; also every lane the vector path left */
        uint64_t counter = first + (uint64_t)i;
        uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = index, c3 = 0;
        for (int r = 0; r < ROUNDS; r++) {
            uint64_t p0 = (uint64_t)c0 * M0;
            uint64_t p1 = (uint64_t)c2 * M1;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ key0[r];
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ key1[r];
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
        }
        w0[i] = c0;
        w1[i] = c1;
        w2[i] = c2;
        w3[i] = c3;
    }
}

static inline float bits_to_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t float_to_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* r = sqrt(-2 ln u), u = ((word >> 8) + 1) / 2^24 in (0, 1]. */
static inline float radius(uint32_t word) {
    float f = (float)((word >> 8) + 1u); /* exact: at most 2^24 */
    uint32_t bits = float_to_bits(f);
    int32_t e = (int32_t)(bits >> 23) - 127;
    float m = bits_to_float((bits & 0x7FFFFFu) | 0x3F800000u); /* f = m 2^e, m in [1, 2) */
    int32_t big = m > 1.41421353816986083984375f;
    m = big ? m * 0.5f : m; /* m in [sqrt(1/2), sqrt(2)] */
    e = e + big;
    float s = (m - 1.0f) / (m + 1.0f); /* ln m = 2 atanh(s) */
    float s2 = s * s;
    float p = 0.111111111938953399658203125f; /* 1/9 */
    p = p * s2 + 0.142857149243354797363281250f; /* 1/7 */
    p = p * s2 + 0.200000002980232238769531250f; /* 1/5 */
    p = p * s2 + 0.333333343267440795898437500f; /* 1/3 */
    float twice = s + s;
    float ln_m = twice * (p * s2) + twice;
    float k = (float)(e - 24);
    float ln_u = k * 0.693145751953125f + (k * 1.428606765330187045037746429443359375e-6f + ln_m);
    return sqrtf(ln_u * -2.0f);
}

/* cos and sin of 2 pi a / 2^24, a = word >> 8: octant from the top 3 bits (exact). */
static inline void cos_sin(uint32_t word, float *c_out, float *s_out) {
    uint32_t a = word >> 8;
    uint32_t octant = a >> 21;
    uint32_t low = a & 0x1FFFFFu;
    uint32_t odd = octant & 1u;
    uint32_t within = odd ? 0x200000u - low : low;
    float x = (float)within * 3.745070282923589484626427292823791503906e-7f; /* pi/4 / 2^21 */
    float x2 = x * x;
    float ps = 2.755731884462875314056873321533203125e-6f; /* 1/9! */
    ps = ps * x2 + -1.98412701138295233249664306640625e-4f; /* -1/7! */
    ps = ps * x2 + 8.333333767950534820556640625e-3f;     /* 1/5! */
    ps = ps * x2 + -0.16666667163372039794921875f;        /* -1/3! */
    float sn = (ps * x2) * x + x;
    float pc = 2.48015876e-5f; /* 1/8! */
    pc = pc * x2 + -1.388888922519981861114501953125e-3f; /* -1/6! */
    pc = pc * x2 + 4.1666667163372039794921875e-2f;       /* 1/4! */
    pc = pc * x2 + -0.5f;
    float cs = pc * x2 + 1.0f;
    sn = odd ? -sn : sn; /* odd octants: angle = k pi/2 - x */
    uint32_t quadrant = ((octant + 1u) >> 1) & 3u;
    float sine = quadrant == 0 ? sn : quadrant == 1 ? cs : quadrant == 2 ? -sn : -cs;
    float cosine = quadrant == 0 ? cs : quadrant == 1 ? -sn : quadrant == 2 ? -cs : sn;
    *c_out = cosine;
    *s_out = sine;
}

/* values[4 i + lane] for counters first .. first + count - 1 (count <= TILE). */
static void values_tile(uint64_t first, int count, uint32_t index, uint64_t seed, int gaussian,
                        float *restrict values) {
    uint32_t w0[TILE], w1[TILE], w2[TILE], w3[TILE];
    philox_words(first, count, index, seed, w0, w1, w2, w3);
    if (!gaussian) {
        for (int i = 0; i < count; i++) {
            values[4 * i + 0] = 1.0f - (float)((w0[i] >> 31) * 2u);
            values[4 * i + 1] = 1.0f - (float)((w1[i] >> 31) * 2u);
            values[4 * i + 2] = 1.0f - (float)((w2[i] >> 31) * 2u);
            values[4 * i + 3] = 1.0f - (float)((w3[i] >> 31) * 2u);
        }
        return;
    }
    float r0[TILE], r1[TILE], c0[TILE], s0[TILE], c1[TILE], s1[TILE];
    for (int i = 0; i < count; i++) {
        r0[i] = radius(w0[i]);
        r1[i] = radius(w2[i]);
    }
    for (int i = 0; i < count; i++) {
        cos_sin(w1[i], &c0[i], &s0[i]);
        cos_sin(w3[i], &c1[i], &s1[i]);
    }
    for (int i = 0; i < count; i++) {
        values[4 * i + 0] = r0[i] * c0[i];
        values[4 * i + 1] = r0[i] * s0[i];
        values[4 * i + 2] = r1[i] * c1[i];
        values[4 * i + 3] = r1[i] * s1[i];
    }
}

/* Walk [start, start + n) tile by tile: body(tile values, position in the range, length). */
#define FOR_EACH_TILE(start, n, index, seed, gaussian, values, done, take, BODY)               \
    do {                                                                                       \
        int64_t done = 0;                                                                      \
        while (done < (n)) {                                                                   \
            int64_t position = (start) + done;                                                 \
            uint64_t first = (uint64_t)position >> 2;                                          \
            int skip = (int)(position & 3);                                                    \
            int64_t wanted = (n) - done;                                                       \
            int64_t counters = (wanted + skip + 3) >> 2;                                       \
            int count = counters < TILE ? (int)counters : TILE;                                \
            int64_t take = 4 * (int64_t)count - skip;                                          \
            if (take > wanted) take = wanted;                                                  \
            values_tile(first, count, (index), (seed), (gaussian), (values));                  \
            BODY;                                                                              \
            done += take;                                                                      \
        }                                                                                      \
    } while (0)

/* out[k] = z(seed, index)[start + k] for k < n. */
void zo_fill(float *out, int64_t n, uint64_t seed, uint32_t index, int64_t start, int gaussian) {
    float values[4 * TILE];
    FOR_EACH_TILE(start, n, index, seed, gaussian, values, done, take, {
        int skip = (int)((start + done) & 3);
        memcpy(out + done, values + skip, (size_t)take * sizeof(float));
    });
}

/* out[k, :] = z(seed, index)[ids[k] * row : (ids[k] + 1) * row] for k < count. */
void zo_fill_rows(float *out, const int64_t *ids, int64_t count, int64_t row, uint64_t seed,
                  uint32_t index, int gaussian) {
    for (int64_t k = 0; k < count; k++) {
        zo_fill(out + k * row, row, seed, index, ids[k] * row, gaussian);
    }
}

/* target[k] = (decay ? d * source[k] : source[k]) + sum_q z(seeds[q])[start + k] * factors[q],
 * each product and sum rounded once in fp32, in that order (the torch reference's order). A
 * target may be its own source. */
void zo_axpz_f32(const float *source, float *target, int64_t n, uint32_t index, int64_t start,
                 const uint64_t *seeds, const float *factors, int queries, int decay, float d,
                 int gaussian) {
    float values[4 * TILE];
    float acc[4 * TILE];
    int64_t done = 0;
    while (done < n) {
        int64_t position = start + done;
        int skip = (int)(position & 3);
        int64_t counters = (n - done + skip + 3) >> 2;
        int count = counters < TILE ? (int)counters : TILE;
        int64_t take = 4 * (int64_t)count - skip;
        if (take > n - done) take = n - done;
        const float *src = source + done;
        float *dst = target + done;
        if (queries == 1 && !decay) { /* a perturbed copy or plain update: one pass */
            values_tile((uint64_t)position >> 2, count, index, seeds[0], gaussian, values);
            const float *z = values + skip;
            float factor = factors[0];
            for (int64_t k = 0; k < take; k++) dst[k] = src[k] + z[k] * factor;
        } else {
            if (decay) {
                for (int64_t k = 0; k < take; k++) acc[k] = src[k] * d;
            } else {
                memcpy(acc, src, (size_t)take * sizeof(float));
            }
            for (int q = 0; q < queries; q++) {
                values_tile((uint64_t)position >> 2, count, index, seeds[q], gaussian, values);
                const float *z = values + skip;
                float factor = factors[q];
                for (int64_t k = 0; k < take; k++) acc[k] = acc[k] + z[k] * factor;
            }
            memcpy(dst, acc, (size_t)take * sizeof(float));
        }
        done += take;
    }
}

/* zo_axpz_f32 over `count` tensors at once, cut into pieces of `piece` elements that run on
 * up to `threads` OpenMP threads. A piece's values do not depend on the cut: each element is
 * computed from its own coordinates, in the same order, whichever thread computes it. */
void zo_axpz_many(int count, const float *const *sources, float *const *targets,
                  const int64_t *lengths, const uint32_t *indices, const int64_t *starts,
                  const uint64_t *seeds, const float *factors, int queries, int decay, float d,
                  int gaussian, int64_t piece, int threads) {
    int64_t pieces = 0;
    for (int t = 0; t < count; t++) pieces += (lengths[t] + piece - 1) / piece;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1 && pieces > 1)
#endif
    for (int64_t p = 0; p < pieces; p++) {
        int t = 0;
        int64_t before = 0; /* pieces of the tensors ahead of t: a scan, count is small */
        while (before + (lengths[t] + piece - 1) / piece <= p) {
            before += (lengths[t] + piece - 1) / piece;
            t++;
        }
        int64_t offset = (p - before) * piece;
        int64_t take = lengths[t] - offset < piece ? lengths[t] - offset : piece;
        zo_axpz_f32(sources[t] + offset, targets[t] + offset, take, indices[t],
                    starts[t] + offset, seeds, factors, queries, decay, d, gaussian);
    }
    (void)threads;
}
