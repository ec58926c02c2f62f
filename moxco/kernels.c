/* moxco's fused CPU reductions over parameter lists (loaded by moxco/native.py through ctypes).
 *
 * Each function walks a list of nt contiguous tensors, given as arrays of data pointers and
 * element counts, in one pass: every operand is read once and at most one is written. The eager
 * equivalents in moxco/tensors.py take several multi-tensor passes (and so several trips through
 * memory) for the same sums. Sums are accumulated in double precision per SIMD lane, so their
 * relative error stays near 1e-12 however long the tensors are; the elementwise differences are
 * taken in the tensors' own type, as the eager code does.
 *
 * Work is split over `threads` POSIX threads by ranges of the concatenated elements; each thread
 * writes its own partial sums, which are added in thread order: for a given thread count the
 * result does not depend on scheduling.
 *
 * Operations (`op`):
 *   OP_STEP   a = g, b = x, c = p (written), d = o or NULL:
 *             out = [|g|^2, <g, x - p>, |x - p|^2, |x - o|^2], and p <- x, bit for bit;
 *   OP_NORMS  a = v: out[t] = |v_t|^2 for every tensor t;
 *   OP_DIST   a = x, b = y, scale s: out = [|s x - y|^2];
 *   OP_SUMS   OP_STEP's sums without writing p;
 *   OP_POWER  a = v, b = h (= Mv), scale s: out = [<v, h>, |h|^2, |h - s v|^2] (a power step's sums).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { OP_STEP = 0, OP_NORMS = 1, OP_DIST = 2, OP_SUMS = 3, OP_POWER = 4 };
enum { MAX_THREADS = 64 };

typedef struct {
    int op;
    int64_t nt;
    void *const *a, *const *b, *const *c, *const *d;
    const int64_t *numel;
    double scale;
    int64_t begin, end; /* this job's range of the concatenated elements */
    double *out;        /* this job's partial sums: 4 (STEP, SUMS), nt (NORMS), 1 (DIST), 3 (POWER) */
} job_t;

/* one loop per case (origin or not, writing p or not), so that each vectorises without branches */
#define STEP_LOOP(T, WITH_O, WRITE)                                                                 \
    _Pragma("omp simd reduction(+:gd,dd,oo,gg)") for (int64_t j = 0; j < n; j++) {                  \
        T xv = x[j], dv = xv - p[j];                                                                \
        gd += (double)dv * (double)g[j];                                                            \
        gg += (double)g[j] * (double)g[j];                                                          \
        dd += (double)dv * (double)dv;                                                              \
        if (WITH_O) { T ev = xv - o[j]; oo += (double)ev * (double)ev; }                            \
        if (WRITE) p[j] = xv;                                                                       \
    }

#define DEFINE_RANGES(T, SFX)                                                                       \
    static void step_##SFX(const T *g, const T *x, T *p, const T *o, int write, int64_t n,          \
                           double *out) {                                                           \
        double gd = 0, dd = 0, oo = 0, gg = 0;                                                      \
        if (o && write) { STEP_LOOP(T, 1, 1) }                                                      \
        else if (o) { STEP_LOOP(T, 1, 0) }                                                          \
        else if (write) { STEP_LOOP(T, 0, 1) }                                                      \
        else { STEP_LOOP(T, 0, 0) }                                                                 \
        out[0] += gg; out[1] += gd; out[2] += dd; out[3] += oo;                                     \
    }                                                                                               \
    static double sq_##SFX(const T *v, int64_t n) {                                                 \
        double s = 0;                                                                               \
        _Pragma("omp simd reduction(+:s)") for (int64_t j = 0; j < n; j++) {                        \
            s += (double)v[j] * (double)v[j];                                                       \
        }                                                                                           \
        return s;                                                                                   \
    }                                                                                               \
    static double dist_##SFX(const T *x, const T *y, T s, int64_t n) {                              \
        double acc = 0;                                                                             \
        if (s == (T)1) {                                                                            \
            _Pragma("omp simd reduction(+:acc)") for (int64_t j = 0; j < n; j++) {                  \
                T dv = x[j] - y[j];                                                                 \
                acc += (double)dv * (double)dv;                                                     \
            }                                                                                       \
        } else {                                                                                    \
            _Pragma("omp simd reduction(+:acc)") for (int64_t j = 0; j < n; j++) {                  \
                T dv = s * x[j] - y[j];                                                             \
                acc += (double)dv * (double)dv;                                                     \
            }                                                                                       \
        }                                                                                           \
        return acc;                                                                                 \
    }                                                                                               \
    static void power_##SFX(const T *v, const T *h, T s, int64_t n, double *out) {                \
        double vh = 0, hh = 0, ww = 0;                                                              \
        _Pragma("omp simd reduction(+:vh,hh,ww)") for (int64_t j = 0; j < n; j++) {                \
            T hv = h[j], wv = hv - s * v[j];                                                        \
            vh += (double)v[j] * (double)hv;                                                        \
            hh += (double)hv * (double)hv;                                                          \
            ww += (double)wv * (double)wv;                                                          \
        }                                                                                           \
        out[0] += vh; out[1] += hh; out[2] += ww;                                                   \
    }                                                                                               \
    static void run_##SFX(job_t *job) {                                                             \
        int64_t start = 0;                                                                          \
        for (int64_t t = 0; t < job->nt && start < job->end; t++) {                                 \
            int64_t n = job->numel[t], lo = job->begin - start, hi = job->end - start;              \
            start += n;                                                                             \
            if (lo < 0) lo = 0;                                                                     \
            if (hi > n) hi = n;                                                                     \
            if (lo >= hi) continue;                                                                 \
            int64_t m = hi - lo;                                                                    \
            if (job->op == OP_STEP || job->op == OP_SUMS) {                                         \
                const T *o = job->d ? (const T *)job->d[t] + lo : NULL;                             \
                step_##SFX((const T *)job->a[t] + lo, (const T *)job->b[t] + lo,                    \
                           (T *)job->c[t] + lo, o, job->op == OP_STEP, m, job->out);                \
            } else if (job->op == OP_NORMS) {                                                       \
                job->out[t] += sq_##SFX((const T *)job->a[t] + lo, m);                              \
            } else if (job->op == OP_POWER) {                                                       \
                power_##SFX((const T *)job->a[t] + lo, (const T *)job->b[t] + lo, (T)job->scale, m,  \
                            job->out);                                                              \
            } else {                                                                                \
                job->out[0] += dist_##SFX((const T *)job->a[t] + lo, (const T *)job->b[t] + lo,     \
                                          (T)job->scale, m);                                        \
            }                                                                                       \
        }                                                                                           \
    }

DEFINE_RANGES(float, f32)
DEFINE_RANGES(double, f64)

typedef struct {
    job_t job;
    int is_double;
} task_t;

static void *run_task(void *arg) {
    task_t *task = (task_t *)arg;
    if (task->is_double) run_f64(&task->job); else run_f32(&task->job);
    return NULL;
}

/* Returns 0, or -1 when the arguments are out of range (nothing is read or written then). */
int moxco_reduce(int op, int is_double, int64_t nt, void *const *a, void *const *b, void *const *c,
                 void *const *d, const int64_t *numel, double scale, int threads, double *out) {
    if (nt < 0 || threads < 1 || op < OP_STEP || op > OP_POWER) return -1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int64_t width = op == OP_STEP || op == OP_SUMS ? 4 : op == OP_NORMS ? nt : op == OP_POWER ? 3 : 1,
            total = 0;
    for (int64_t t = 0; t < nt; t++) {
        if (numel[t] < 0) return -1;
        total += numel[t];
    }
    if (total < threads) threads = 1;
    double *partial = calloc((size_t)(threads * (width > 0 ? width : 1)), sizeof(double));
    task_t *tasks = calloc((size_t)threads, sizeof(task_t));
    pthread_t *ids = calloc((size_t)threads, sizeof(pthread_t));
    char *started = calloc((size_t)threads, 1);
    if (!partial || !tasks || !ids || !started) {
        free(partial); free(tasks); free(ids); free(started);
        return -1;
    }
    for (int k = 0; k < threads; k++) {
        job_t job = {op, nt, a, b, c, d, numel, scale, total / threads * k,
                     k == threads - 1 ? total : total / threads * (k + 1), partial + k * width};
        tasks[k].job = job;
        tasks[k].is_double = is_double;
    }
    for (int k = 1; k < threads; k++)  /* a thread that cannot start is run here instead */
        started[k] = pthread_create(&ids[k], NULL, run_task, &tasks[k]) == 0;
    run_task(&tasks[0]);
    for (int k = 1; k < threads; k++) {
        if (started[k]) pthread_join(ids[k], NULL); else run_task(&tasks[k]);
    }
    memset(out, 0, (size_t)width * sizeof(double));
    for (int k = 0; k < threads; k++)
        for (int64_t i = 0; i < width; i++) out[i] += partial[k * width + i];
    free(partial); free(tasks); free(ids); free(started);
    return 0;
}
