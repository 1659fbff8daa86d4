/* Exact summation kernels of unitedllm.optimizers.exact_sum, loaded with ctypes by _native.py.
 *
 * Built on first use with the system C compiler, for a named x86-64 level (never -march=native),
 * without fast-math or FMA contraction: the error-free transformations give the same bytes on
 * every machine and as the pure-torch path.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 512
#define PREFETCH_AHEAD 8192  /* elements; see prefetch_ahead */

/* Every worker claims chunks [c, c + chunk) of [.., end) from *next, which all the
 * workers of one call share, until none is left; chunks are multiples of BLOCK. */
#define FOR_EACH_CHUNK(C, STOP)                                                 \
    for (int64_t C, STOP; (C = __atomic_fetch_add(next, chunk, __ATOMIC_RELAXED)) < end \
         && ((STOP = C + chunk < end ? C + chunk : end), 1);)

static inline double bf16_to_double(uint16_t v) {
    uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return (double)f;
}

/* TwoSum e into levels from..nlev-1 at element i; what the last level cannot hold is returned (0 if none). */
static inline double cascade(double **lev, int from, int nlev, int64_t i, double e) {
    for (int l = from; l < nlev; l++) {
        double a = lev[l][i];
        double t = a + e;
        double z = t - a;
        double r = (a - (t - z)) + (e - z);
        lev[l][i] = t;
        if (r == 0.0) return 0.0;
        e = r;
    }
    return e;
}

/* Branch-free (vectorisable) TwoSum of each term into acc[j]; the rounding errors go to ebuf. */
#define TWOSUM_INTO(ACC, TERM)                                         \
    for (int64_t j = 0; j < n; j++) {                                  \
        double p = (TERM);                                             \
        double a = (ACC)[j];                                           \
        double t = a + p;                                              \
        double z = t - a;                                              \
        double e = (a - (t - z)) + (p - z);                            \
        (ACC)[j] = t;                                                  \
        ebuf[j] = e;                                                   \
        uint64_t bits; memcpy(&bits, &e, 8);                           \
        any |= bits << 1; /* all but the sign: -0.0 counts as 0 */     \
    }

/* What one exact_add call folds in; every worker of the call shares it. */
typedef struct {
    double **lev;            /* the levels, nlev >= 2 */
    int32_t nlev;
    int32_t nx;              /* inputs, at most 64 */
    const void **xs;         /* input k: nx float32 or bfloat16 arrays */
    const int32_t *dtypes;
    const double *ws;        /* input k is added times ws[k] */
    uint8_t *lo_used;        /* per block: level 1 holds something there */
    const uint64_t *skip;    /* per block: bit k set = leave input k out there (NULL: none) */
    uint64_t *nonfinite;     /* per block: bit k set = input k has inf/NaN there and was left
                                out (NULL: no check) */
    int32_t fresh;           /* level 0 holds garbage: input 0 is stored into it, not added */
    int32_t late_check;      /* with nonfinite: check inputs other than a stored first one only
                                in blocks that leave a rounding error (inf and NaN always do), after
                                adding them; such a block's sum is spoilt, so the caller must throw
                                the whole sum away when any input is found non-finite */
} fold_args;

static inline int block_finite(const void *x, int32_t dtype, int64_t b, int64_t n) {
    uint32_t bad = 0;
    if (dtype == 0) {
        const uint32_t *u = (const uint32_t *)x + b;
        for (int64_t j = 0; j < n; j++) bad |= (u[j] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *u = (const uint16_t *)x + b;
        for (int64_t j = 0; j < n; j++) bad |= (u[j] & 0x7f80u) == 0x7f80u;
    }
    return !bad;
}

/* Asks for the block PREFETCH_AHEAD elements further along input k, past the chunk's end
 * too: there it is the same input's part of a chunk folded soon after. The hardware
 * prefetchers alone fall behind the arithmetic; this doubled the throughput where measured
 * (bench/README.md), more than prefetching the next input's part of this chunk did.
 * Prefetches never fault, so reading ahead of an input's end is harmless. */
static inline void prefetch_ahead(const fold_args *a, int k, int64_t b) {
    int64_t size = a->dtypes[k] == 0 ? 4 : 2;
    uintptr_t p = (uintptr_t)a->xs[k] + (uintptr_t)((b + PREFETCH_AHEAD) * size);
    for (int64_t off = 0; off < BLOCK * size; off += 64) __builtin_prefetch((const void *)(p + off));
}

/* Adds input k into one block; lo (level 1) is read only when level 0 leaves an error.
 * Returns how many values even the deepest level could not hold (put in ovf_idx/ovf_val);
 * sets *deep when something went to level 2 or deeper. */
static int64_t add_input_block(const fold_args *a, int k, int64_t b, int64_t n, int64_t *ovf_idx, double *ovf_val,
                               int *deep) {
    double ebuf[BLOCK];
    double *h = a->lev[0] + b;
    int64_t blk = b / BLOCK, novf = 0;
    int store = a->fresh && k == 0;
    int late = a->late_check && !store;
    if (late && a->nonfinite[blk]) return 0;  /* spoilt already: the caller throws the sum away */
    int skipped = a->skip && (a->skip[blk] >> k & 1);
    int bad = !skipped && a->nonfinite && !late && !block_finite(a->xs[k], a->dtypes[k], b, n);
    if (skipped || bad) {
        if (bad) a->nonfinite[blk] |= 1ull << k;
        if (store) memset(h, 0, sizeof(double) * n);
        return 0;
    }
    double w = a->ws[k];
    if (store) {  /* w * x is exact: nothing for level 1 */
        if (a->dtypes[k] == 0) {
            const float *x = (const float *)a->xs[k] + b;
            for (int64_t j = 0; j < n; j++) h[j] = w * (double)x[j];
        } else {
            const uint16_t *x = (const uint16_t *)a->xs[k] + b;
            for (int64_t j = 0; j < n; j++) h[j] = w * bf16_to_double(x[j]);
        }
        return 0;
    }
    uint64_t any = 0;
    if (a->dtypes[k] == 0) {
        const float *x = (const float *)a->xs[k] + b;
        TWOSUM_INTO(h, w * (double)x[j])
    } else {
        const uint16_t *x = (const uint16_t *)a->xs[k] + b;
        TWOSUM_INTO(h, w * bf16_to_double(x[j]))
    }
    if (!any) return 0;
    if (late && !block_finite(a->xs[k], a->dtypes[k], b, n)) {
        a->nonfinite[blk] |= 1ull << k;
        return 0;
    }
    a->lo_used[blk] = 1;
    double *lo = a->lev[1] + b;
    any = 0;
    TWOSUM_INTO(lo, ebuf[j])
    if (!any) return 0;
    *deep = 1;
    for (int64_t j = 0; j < n; j++) {
        if (ebuf[j] == 0.0) continue;
        double left = cascade(a->lev, 2, a->nlev, b + j, ebuf[j]);
        if (left != 0.0) { ovf_idx[novf] = b + j; ovf_val[novf] = left; novf++; }
    }
    return novf;
}

/* Folds the inputs into the chunk [c, stop) one input at a time, starting with input k0 at
 * block b0: the chunk's accumulator stays in cache while every input streams through it
 * once, so memory traffic is the inputs plus one write of the chunk however many inputs
 * there are. After a block that overflowed it stops and puts where to go on in resume[0..3]
 * (chunk start, chunk stop, input, block; input == nx: the chunk is done). */
static int64_t fold_chunk(const fold_args *a, int64_t c, int64_t stop, int32_t k0, int64_t b0,
                          int64_t *ovf_idx, double *ovf_val, int64_t *resume, int *deep) {
    for (int k = k0; k < a->nx; k++) {
        for (int64_t b = k == k0 ? b0 : c; b < stop; b += BLOCK) {
            int64_t n = stop - b < BLOCK ? stop - b : BLOCK;
            prefetch_ahead(a, k, b);
            int64_t novf = add_input_block(a, k, b, n, ovf_idx, ovf_val, deep);
            if (novf) {
                int next_k = b + n < stop ? k : k + 1;
                resume[0] = c; resume[1] = stop; resume[2] = next_k; resume[3] = b + n < stop ? b + n : c;
                return novf;
            }
        }
    }
    return 0;
}

int64_t ul_fold_chunk(const fold_args *a, int64_t c, int64_t stop, int32_t k0, int64_t b0,
                      int64_t *ovf_idx, double *ovf_val, int64_t *resume) {
    int deep = 0;
    return fold_chunk(a, c, stop, k0, b0, ovf_idx, ovf_val, resume, &deep);
}

/* Worker adding ws[k] * xs[k][i] exactly into the levels for i < end, chunk by chunk. What
 * even the deepest level cannot hold goes to the overflow buffers (room for BLOCK values);
 * the worker then stops, with where to go on in resume[0..3] (see ul_fold_chunk), and
 * returns the number of overflow values (0 when it found no more work). */
int64_t ul_exact_add(const fold_args *a, int64_t end, int64_t chunk, int64_t *next,
                     int64_t *ovf_idx, double *ovf_val, int64_t *resume) {
    FOR_EACH_CHUNK(c, stop) {
        int64_t novf = ul_fold_chunk(a, c, stop, 0, c, ovf_idx, ovf_val, resume);
        if (novf) return novf;
    }
    return 0;
}

/* Adds val[j] at element idx[j] into levels from..nlev-1; what is left over is moved to the
 * front of idx/val and counted in the return value. */
int64_t ul_deposit(double **lev, int from, int nlev, int64_t *idx, double *val, int64_t n) {
    int64_t left = 0;
    for (int64_t j = 0; j < n; j++) {
        double r = cascade(lev, from, nlev, idx[j], val[j]);
        if (r != 0.0) { idx[left] = idx[j]; val[left] = r; left++; }
    }
    return left;
}

/* Worker: out[i] = (hi[i] + lo[i]) / divisor, reading lo only in blocks where it was used. */
void ul_finish(const double *hi, const double *lo, const uint8_t *lo_used, double divisor, double *out,
               int64_t end, int64_t chunk, int64_t *next) {
    FOR_EACH_CHUNK(c, stop) {
        for (int64_t b = c; b < stop; b += BLOCK) {
            int64_t n = stop - b < BLOCK ? stop - b : BLOCK;
            const double *h = hi + b, *l = lo + b;
            double *o = out + b;
            if (lo_used[b / BLOCK]) {
                for (int64_t j = 0; j < n; j++) o[j] = (h[j] + l[j]) / divisor;
            } else {
                for (int64_t j = 0; j < n; j++) o[j] = h[j] / divisor;
            }
        }
    }
}

/* Worker: out[i] = (float)((double)w[i] + scale * ((hi[i] + lo[i]) / divisor)), the same
 * roundings as ul_finish, then times scale (skipped when it is 1), then ul_apply_f32, in
 * one pass: a float32 model plus a scaled mean, without the float64 mean in memory. */
static inline void finish_apply_block(const double *h, const double *l, int used, double divisor, double scale,
                                      const float *x, float *o, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        double m = (used ? h[j] + l[j] : h[j]) / divisor;
        if (scale != 1.0) m = m * scale;
        o[j] = (float)((double)x[j] + m);
    }
}

void ul_finish_apply_f32(const double *hi, const double *lo, const uint8_t *lo_used, double divisor,
                         double scale, const float *w, float *out, int64_t end, int64_t chunk, int64_t *next) {
    FOR_EACH_CHUNK(c, stop) {
        for (int64_t b = c; b < stop; b += BLOCK) {
            int64_t n = stop - b < BLOCK ? stop - b : BLOCK;
            finish_apply_block(hi + b, lo + b, lo_used[b / BLOCK], divisor, scale, w + b, out + b, n);
        }
    }
}

#define MAX_LEVELS 64  /* float64 levels never need more than ~40 (2098 exponents / 53 bits) */

/* Worker for a whole round of a plain mean step in one pass: every input is folded into this
 * thread's scratch chunk (level 0 of elements [c, stop) at scratch[0 .. stop - c)), then
 * out = (float)(w + scale * ((hi + lo) / divisor)) is written for the chunk while it is in
 * cache (ul_finish_apply_f32's roundings). Level 0 never reaches memory, so the pass moves
 * the inputs, w and out, and nothing else. A chunk whose fold reached level 2 spills: its
 * scratch is copied to the real level 0, it is left unfinished and its start is listed in
 * spilled[] (the caller finishes it once its deep elements are known). An overflow spills
 * its chunk too and stops the worker as in ul_exact_add (the caller goes on from the real
 * level 0). */
int64_t ul_fold_finish_f32(const fold_args *a, double *scratch, double divisor, double scale, const float *w,
                           float *out, int64_t end, int64_t chunk, int64_t *next, int64_t *spilled,
                           int64_t *nspilled, int64_t *ovf_idx, double *ovf_val, int64_t *resume) {
    double *lev[MAX_LEVELS];
    fold_args t = *a;  /* this thread's: its own level 0 */
    if (a->nlev > MAX_LEVELS) return -1;
    for (int l = 0; l < a->nlev; l++) lev[l] = a->lev[l];
    t.lev = lev;
    t.fresh = 1;
    FOR_EACH_CHUNK(c, stop) {
        lev[0] = (double *)((uintptr_t)scratch - (uintptr_t)c * sizeof(double));  /* lev[0][i] = scratch[i - c] */
        int deep = 0;
        int64_t novf = fold_chunk(&t, c, stop, 0, c, ovf_idx, ovf_val, resume, &deep);
        if (deep) {  /* an overflow always went through level 2 first */
            memcpy(a->lev[0] + c, scratch, sizeof(double) * (stop - c));
            spilled[(*nspilled)++] = c;
            if (novf) return novf;
            continue;
        }
        for (int64_t b = c; b < stop; b += BLOCK) {
            int64_t n = stop - b < BLOCK ? stop - b : BLOCK;
            finish_apply_block(scratch + (b - c), a->lev[1] + b, a->lo_used[b / BLOCK], divisor, scale, w + b,
                               out + b, n);
        }
    }
    return 0;
}

/* Worker: out[i] = (float)((double)w[i] + step[i]), the float32 model plus a float64 step. */
void ul_apply_f32(const float *w, const double *step, float *out, int64_t end, int64_t chunk, int64_t *next) {
    FOR_EACH_CHUNK(c, stop) {
        for (int64_t i = c; i < stop; i++) out[i] = (float)((double)w[i] + step[i]);
    }
}

/* Worker: the number of non-finite values (exponent bits all ones) among x[0..end). */
int64_t ul_count_nonfinite(const void *x, int32_t dtype, int64_t end, int64_t chunk, int64_t *next) {
    int64_t bad = 0;
    FOR_EACH_CHUNK(c, stop) {
        if (dtype == 0) {
            const uint32_t *u = (const uint32_t *)x;
            for (int64_t i = c; i < stop; i++) bad += (u[i] & 0x7f800000u) == 0x7f800000u;
        } else {
            const uint16_t *u = (const uint16_t *)x;
            for (int64_t i = c; i < stop; i++) bad += (u[i] & 0x7f80u) == 0x7f80u;
        }
    }
    return bad;
}
