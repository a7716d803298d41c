/* SnAp-1's C loops: trainers/snap/native.py documents them and compiles this file on first
   use, the line holding only the trees marker replaced by the generated shuffle-tree sums. */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* Influence entries of unused inputs decay geometrically into subnormal numbers, which x86
   computes on dozens of times slower: flush them (and read them) as zero inside the loops. */
#define FTZ_BEGIN const unsigned int mxcsr_ = _mm_getcsr(); _mm_setcsr(mxcsr_ | 0x8040);
#define FTZ_END _mm_setcsr(mxcsr_);
#else
#define FTZ_BEGIN
#define FTZ_END
#endif

/* One part's operands (part 0: A = [W | b] on [x, 1]; part 1: B = U on h). */
#define PART_VARS(T)                                                                            \
            const int n = part ? nB : nA;                                                      \
            const T *restrict m = part ? mB : mA, *restrict src = part ? srcB : srcA;          \
            const int32_t *restrict cols = part ? colsB : colsA;                               \
            T *restrict J = part ? JB : JA, *restrict g = part ? gB : gA;                      \
            const int64_t plane = (int64_t)H * G * n * B;

/* Gate q's multipliers of unit u's h and c rows, for every example. */
#define GATE_MULTIPLIERS(MH, MC)                                                                \
                for (int b = 0; b < B; b++) {                                                  \
                    const int64_t bu = (int64_t)b * H + u;                                     \
                    MH[b] = m[bu * c * G + q];                                                 \
                    MC[b] = c == 2 ? m[(bu * c + 1) * G + q] : 0;                              \
                }

/* Unit u's own-unit block of D for every example (E plus the recurrent products' own-unit
   weights, column 0) and its read-out sensitivities, into per-example arrays. */
#define OWN_BLOCK(T, D00, D01, D10, D11, EH, EC)                                                \
        for (int b = 0; b < B; b++) {                                                          \
            const int64_t bu = (int64_t)b * H + u;                                             \
            T r0 = 0, r1 = 0;                                                                  \
            for (int q = 0; q < G; q++) {                                                      \
                r0 += mB[bu * c * G + q] * udiag[(int64_t)u * G + q];                          \
                if (c == 2) r1 += mB[(bu * c + 1) * G + q] * udiag[(int64_t)u * G + q];        \
            }                                                                                  \
            D00[b] = E[bu * c * c] + r0;                                                       \
            D01[b] = c == 2 ? E[bu * 4 + 1] : 0;                                               \
            D10[b] = c == 2 ? E[bu * 4 + 2] + r1 : 0;                                          \
            D11[b] = c == 2 ? E[bu * 4 + 3] : 0;                                               \
            EH[b] = eps ? eps[bu] : 0;                                                         \
            EC[b] = (eps && epsc) ? epsc[bu] : 0;                                              \
        }

/* Units [u0, u1) of one step. Storage (unit-major, example innermost, so that the examples of
   one entry are one vector and the gathered input of a column is one contiguous load):
     J part P: (c, H, G, nP, B);  g part P: (H, G, nP)
     E: (B, H, c, c);  mP: (B, H, c, G);  udiag: (H, G);
     eps, epsc: dL/ds for h and c, (B, H) each; eps NULL: no loss; epsc NULL: zero
     ckeep: bit q set keeps the c row of gate q's entries (LSTM); clear: held at zero (SnAp's
     jacobian pattern: the output gate has no immediate influence on c)
     srcA: (rowsA, B) = [x, 1]^T,  srcB: (H, B) = h^T;  colsP: (H, G, nP) or NULL (column p).
   NB: a compile-time batch lets the compiler keep the example loop in registers. */
#define STEP(NAME, T, NB, C)                                                                    \
void NAME(int c_, int B_, int H, int G, int nA, int nB, T *restrict JA, T *restrict JB,         \
          const T *restrict E, const T *restrict mA, const T *restrict mB,                     \
          const T *restrict udiag, const T *restrict srcA, const int32_t *restrict colsA,      \
          const T *restrict srcB, const int32_t *restrict colsB, const T *restrict eps,        \
          const T *restrict epsc,                                                              \
          T *restrict gA, T *restrict gB, int ckeep, int u0, int u1) {                                    \
    const int B = NB, c = C;                                                                   \
    T d00[NB], d01[NB], d10[NB], d11[NB], eh[NB], ec[NB], mh[NB], mc[NB];                     \
    FTZ_BEGIN                                                                                  \
    for (int u = u0; u < u1; u++) {                                                            \
        /* own-unit block of D: E plus the recurrent products' own-unit weights (column 0) */   \
        OWN_BLOCK(T, d00, d01, d10, d11, eh, ec)                                               \
        for (int part = 0; part < 2; part++) {                                                 \
            PART_VARS(T)                                                                       \
            for (int q = 0; q < G; q++) {                                                      \
                const int64_t uq = (int64_t)u * G + q;                                         \
                const int keepc = (ckeep >> q) & 1;                                            \
                GATE_MULTIPLIERS(mh, mc)                                                       \
                const int32_t *restrict cl = cols ? cols + uq * n : 0;                         \
                T *restrict gr = g + uq * n;                                                   \
                T *restrict jh = J + uq * n * B, *restrict jc = jh + plane;                    \
                for (int p = 0; p < n; p++, jh += B, jc += B) {                                \
                    const T *restrict v = src + (int64_t)(cl ? cl[p] : p) * B;                 \
                    T acc = 0;                                                                 \
                    if (c == 1) {                                                              \
                        for (int b = 0; b < B; b++) {                                          \
                            T x = d00[b] * jh[b] + mh[b] * v[b];                               \
                            jh[b] = x; acc += eh[b] * x;                                       \
                        }                                                                      \
                    } else {                                                                   \
                        for (int b = 0; b < B; b++) {                                          \
                            T a = jh[b], e = jc[b];                                            \
                            T x = d00[b] * a + d01[b] * e + mh[b] * v[b];                      \
                            T y = keepc ? d10[b] * a + d11[b] * e + mc[b] * v[b] : 0;          \
                            jh[b] = x; jc[b] = y; acc += eh[b] * x;                            \
                            if (epsc) acc += ec[b] * y;                                        \
                        }                                                                      \
                    }                                                                          \
                    if (eps) gr[p] += acc;                                                     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    FTZ_END                                                                                    \
}

/* CSR product, examples innermost: out[r, b] = sum_j val[r, j] * srcT[col[r, j], b]
   (rows r = (gate, unit), k kept columns each; srcT (columns, B)). */
#define CSR(NAME, T, NB)                                                                       \
void NAME(int rows, int k, int B_, const T *restrict val, const int32_t *restrict col,         \
          const T *restrict srcT, T *restrict out) {                                           \
    const int B = NB;                                                                          \
    for (int r = 0; r < rows; r++) {                                                           \
        const T *restrict w = val + (int64_t)r * k;                                            \
        const int32_t *restrict cl = col + (int64_t)r * k;                                     \
        T o[4][NB]; /* four independent sums: the adds' latency, not their count, limits */    \
        for (int a = 0; a < 4; a++)                                                            \
            for (int b = 0; b < B; b++) o[a][b] = 0;                                           \
        int j = 0;                                                                             \
        for (; j + 4 <= k; j += 4)                                                             \
            for (int a = 0; a < 4; a++) {                                                      \
                const T *restrict v = srcT + (int64_t)cl[j + a] * B;                           \
                for (int b = 0; b < B; b++) o[a][b] += w[j + a] * v[b];                        \
            }                                                                                  \
        for (; j < k; j++) {                                                                   \
            const T *restrict v = srcT + (int64_t)cl[j] * B;                                   \
            for (int b = 0; b < B; b++) o[0][b] += w[j] * v[b];                                \
        }                                                                                      \
        for (int b = 0; b < B; b++) out[(int64_t)r * B + b] = (o[0][b] + o[1][b]) + (o[2][b] + o[3][b]); \
    }                                                                                          \
}

/* CSR with a compile-time batch NB: one vector per row, four partial sums (the adds' latency). */
#define CSRV(NAME, T, NB)                                                                      \
typedef T NAME##_v __attribute__((vector_size(NB * sizeof(T))));                               \
void NAME(int rows, int k, int B_, const T *restrict val, const int32_t *restrict col,         \
          const T *restrict srcT, T *restrict out) {                                           \
    typedef NAME##_v V;                                                                        \
    for (int r = 0; r < rows; r++) {                                                           \
        const T *restrict w = val + (int64_t)r * k;                                            \
        const int32_t *restrict cl = col + (int64_t)r * k;                                     \
        V o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0}, v0, v1, v2, v3;                              \
        int j = 0;                                                                             \
        for (; j + 4 <= k; j += 4) {                                                           \
            memcpy(&v0, srcT + (int64_t)cl[j] * NB, sizeof(V));                                \
            memcpy(&v1, srcT + (int64_t)cl[j + 1] * NB, sizeof(V));                            \
            memcpy(&v2, srcT + (int64_t)cl[j + 2] * NB, sizeof(V));                            \
            memcpy(&v3, srcT + (int64_t)cl[j + 3] * NB, sizeof(V));                            \
            o0 += w[j] * v0; o1 += w[j + 1] * v1; o2 += w[j + 2] * v2; o3 += w[j + 3] * v3;    \
        }                                                                                      \
        for (; j < k; j++) {                                                                   \
            memcpy(&v0, srcT + (int64_t)cl[j] * NB, sizeof(V));                                \
            o0 += w[j] * v0;                                                                   \
        }                                                                                      \
        o0 = (o0 + o1) + (o2 + o3);                                                            \
        memcpy(out + (int64_t)r * NB, &o0, sizeof(V));                                         \
    }                                                                                          \
}

/* The rest of one cell step and its Jacobian pieces, as trainers.snap.cells.SparseRNN.
   step_jacobian, from the gates' activations (computed by vectorised torch operations):
   act (B, G, H): GRU z, r, n; LSTM i, f, g, o;  GRU: au2 = (U_n h) at [b * sb + u * su];
   LSTM: cn, tc = c_new, tanh(c_new) (B, H);  state s (B, H, c).
   Writes s_new (B, H, c), mA = dW and mB = dU (B, H, c, G), E (B, H, c, c). */
#define CELL(NAME, T)                                                                          \
void NAME(int lstm, int B, int H, const T *act, const T *au2, int64_t sb, int64_t su,           \
          const T *cn,                                                                         \
          const T *tcn, const T *s, T *s_new, T *mA, T *mB, T *E) {                            \
    const int G = 3 + lstm;                                                                    \
    for (int b = 0; b < B; b++)                                                                \
        for (int u = 0; u < H; u++) {                                                          \
            const int64_t bu = (int64_t)b * H + u;                                             \
            const T *a = act + (int64_t)b * G * H + u;                                         \
            if (!lstm) {                                                                       \
                const T h = s[bu], z = a[0], r = a[H], n = a[2 * H], mn = au2[b * sb + u * su];\
                s_new[bu] = (1 - z) * n + z * h;                                               \
                const T dn = (1 - z) * (1 - n * n), dz = (h - n) * z * (1 - z);                \
                const T dr = dn * mn * r * (1 - r);                                            \
                T *w = mA + bu * 3, *v = mB + bu * 3;                                          \
                w[0] = dz; w[1] = dr; w[2] = dn;                                               \
                v[0] = dz; v[1] = dr; v[2] = dn * r;                                           \
                E[bu] = z;                                                                     \
            } else {                                                                           \
                const T i = a[0], f = a[H], g = a[2 * H], o = a[3 * H];                        \
                const T c_old = s[bu * 2 + 1], tc = tcn[bu], k = o * (1 - tc * tc);            \
                s_new[bu * 2] = o * tc; s_new[bu * 2 + 1] = cn[bu];                            \
                const T dc[4] = {g * i * (1 - i), c_old * f * (1 - f), i * (1 - g * g), 0};    \
                T *w = mA + bu * 8, *v = mB + bu * 8, *e = E + bu * 4;                         \
                for (int q = 0; q < 4; q++) {                                                  \
                    w[q] = v[q] = q == 3 ? tc * o * (1 - o) : k * dc[q];                       \
                    w[4 + q] = v[4 + q] = dc[q];                                               \
                }                                                                              \
                e[0] = 0; e[1] = k * f; e[2] = 0; e[3] = f;                                    \
            }                                                                                  \
        }                                                                                      \
}

CSRV(snap1_csr_f32_b8, float, 8)
CSRV(snap1_csr_f32_b16, float, 16)
CSRV(snap1_csr_f32_b32, float, 32)
CSR(snap1_csr_f32, float, B_)
CSRV(snap1_csr_f64_b8, double, 8)
CSRV(snap1_csr_f64_b16, double, 16)
CSRV(snap1_csr_f64_b32, double, 32)
CSR(snap1_csr_f64, double, B_)
CELL(snap1_cell_f32, float)
CELL(snap1_cell_f64, double)

/* STEP with a compile-time batch NB: the examples of one entry are one vector of type V. */
#define STEPV(NAME, T, NB, C, VT, TREE)                                                        \
void NAME(int c_, int B_, int H, int G, int nA, int nB, T *restrict JA, T *restrict JB,         \
          const T *restrict E, const T *restrict mA, const T *restrict mB,                     \
          const T *restrict udiag, const T *restrict srcA, const int32_t *restrict colsA,      \
          const T *restrict srcB, const int32_t *restrict colsB, const T *restrict eps,        \
          const T *restrict epsc,                                                              \
          T *restrict gA, T *restrict gB, int ckeep, int u0, int u1) {                                    \
    typedef VT V;                                                                              \
    const int B = NB, c = C;                                                                   \
    T d[4][NB], es[2][NB], ms[2][NB];                                                          \
    V d00, d01, d10, d11, eh, ec, mh, mc;                                                      \
    FTZ_BEGIN                                                                                  \
    for (int u = u0; u < u1; u++) {                                                            \
        OWN_BLOCK(T, d[0], d[1], d[2], d[3], es[0], es[1])                                     \
        memcpy(&d00, d[0], sizeof(V)); memcpy(&d01, d[1], sizeof(V));                          \
        memcpy(&d10, d[2], sizeof(V)); memcpy(&d11, d[3], sizeof(V));                          \
        memcpy(&eh, es[0], sizeof(V)); memcpy(&ec, es[1], sizeof(V));                          \
        for (int part = 0; part < 2; part++) {                                                 \
            PART_VARS(T)                                                                       \
            for (int q = 0; q < G; q++) {                                                      \
                const int64_t uq = (int64_t)u * G + q;                                         \
                const int keepc = (ckeep >> q) & 1;                                            \
                GATE_MULTIPLIERS(ms[0], ms[1])                                                 \
                memcpy(&mh, ms[0], sizeof(V)); memcpy(&mc, ms[1], sizeof(V));                  \
                const int32_t *restrict cl = cols ? cols + uq * n : 0;                         \
                T *restrict gr = g + uq * n;                                                   \
                /* blocks of NB entries: their NB sums over the examples come out of one   \
                   shuffle tree as one vector (a zero-padded block at the end) */           \
                for (int p0 = 0; p0 < n; p0 += NB) {                                           \
                    V tt[NB];                                                                  \
                    const int len = n - p0 < NB ? n - p0 : NB;                                 \
                    for (int i = 0; i < len; i++) {                                            \
                        const int p = p0 + i;                                                  \
                        T *restrict jh = J + (uq * n + p) * B, *restrict jc = jh + plane;      \
                        V v, a, e, x, y;                                                       \
                        memcpy(&v, src + (int64_t)(cl ? cl[p] : p) * B, sizeof(V));            \
                        memcpy(&a, jh, sizeof(V));                                             \
                        if (c == 1) {                                                          \
                            x = d00 * a + mh * v;                                              \
                            memcpy(jh, &x, sizeof(V));                                         \
                            tt[i] = eh * x;                                                    \
                        } else {                                                               \
                            memcpy(&e, jc, sizeof(V));                                         \
                            x = d00 * a + d01 * e + mh * v;                                    \
                            y = d10 * a + d11 * e + mc * v;                                    \
                            if (!keepc) y = (V){0};                                            \
                            memcpy(jh, &x, sizeof(V)); memcpy(jc, &y, sizeof(V));              \
                            tt[i] = epsc ? eh * x + ec * y : eh * x;                           \
                        }                                                                      \
                    }                                                                          \
                    if (eps) {                                                                 \
                        for (int i = len; i < NB; i++) tt[i] = (V){0};                         \
                        const V sum = TREE(tt);                                                \
                        for (int i = 0; i < len; i++) gr[p0 + i] += sum[i];                    \
                    }                                                                          \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    FTZ_END                                                                                    \
}

@TREES@

STEPV(snap1_step_f32_c1_b8, float, 8, 1, vf32_8, tree_f32_8)
STEPV(snap1_step_f32_c1_b16, float, 16, 1, vf32_16, tree_f32_16)
STEPV(snap1_step_f32_c1_b32, float, 32, 1, vf32_32, tree_f32_32)
STEP(snap1_step_f32_c1, float, B_, 1)
STEPV(snap1_step_f32_c2_b8, float, 8, 2, vf32_8, tree_f32_8)
STEPV(snap1_step_f32_c2_b16, float, 16, 2, vf32_16, tree_f32_16)
STEPV(snap1_step_f32_c2_b32, float, 32, 2, vf32_32, tree_f32_32)
STEP(snap1_step_f32_c2, float, B_, 2)
STEPV(snap1_step_f64_c1_b8, double, 8, 1, vf64_8, tree_f64_8)
STEPV(snap1_step_f64_c1_b16, double, 16, 1, vf64_16, tree_f64_16)
STEPV(snap1_step_f64_c1_b32, double, 32, 1, vf64_32, tree_f64_32)
STEP(snap1_step_f64_c1, double, B_, 1)
STEPV(snap1_step_f64_c2_b8, double, 8, 2, vf64_8, tree_f64_8)
STEPV(snap1_step_f64_c2_b16, double, 16, 2, vf64_16, tree_f64_16)
STEPV(snap1_step_f64_c2_b32, double, 32, 2, vf64_32, tree_f64_32)
STEP(snap1_step_f64_c2, double, B_, 2)
