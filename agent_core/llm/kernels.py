"""The matrix products of decoding, and which of them this machine runs fastest.

At batch 1 every new token reads every weight once, so decoding speed is memory
bandwidth, and which code reads the weights fastest depends on the CPU: on one AMD
EPYC a plain compiled loop (``gemv`` below: one weight row per dot product, rows split
across the threads, -O3 and vector instructions) read them nearly twice as fast as
oneDNN's packed fp32 path at 1 and 2 rows, and fell behind from 3; on an Intel Xeon
with AVX-512 the same engine was slower than plain ``F.linear``. So nothing here is
tuned for one CPU: the paths this machine has are timed on the model's own layers for
1, 2, 8 and 64 rows (:func:`choose`), each checked against ``F.linear`` first, and the
fastest is kept per batch size. The choice is cached beside the model (``choice.json``
in the kernels folder) under the CPU, torch, the thread count, the layer shapes and the
weights mode, so it is measured once per machine.

The paths (:data:`PATHS`):

- ``gemv``: the compiled loops, built once with torch's extension builder (gcc and
  ninja, 25-45 s) into the model cache. A first start does not wait for it: decoding
  starts on the other paths, and the loop joins the choice once built. Where it cannot
  be built (no compiler, no AVX2), it is left out and that is said once. With
  ``[llm.local] weights = "int8"`` or ``"int4"`` it reads the quantized blocks
  (:mod:`agent_core.llm.quantized`), turning each group of 32 back into fp32 in registers:
  a quarter or less of the bytes, and about 2.5x faster than the fp32 loop here at 1 row.
- ``onednn``: oneDNN's fp32 matmul on weights packed once for it (where torch has it).
- ``linear``: plain ``F.linear``.

In a quantized mode ``onednn`` and ``linear`` run on the dequantized fp32 weights (the
same values), so the mode's fidelity does not depend on the path, and a CPU where the
compiled loop is slow still decodes as fast as fp32 does.

The same build holds ``attend``: a decode step's attention for every row in one call
(the rotary angles, the new key and value written into the cache, each head's softmax
over its row's own length), where torch takes about ten operations a layer. The decoder
checks it against torch's (:func:`agent_core.llm.decoder.decode_attention`) and times
both when it chooses its matmuls, and uses it only where it agrees and is faster.

With both chosen, a decode step is one call, ``decode_step``: the norms, these loops,
the rows' LoRA products, ``attend``, the MLP and the residual sums of every layer, then
the LM head, with no Python between them (a step at one row went from 13.5 ms to 9 ms
here, most of the difference the interpreter and torch's per-operation cost).
``step_timing`` makes it time its own parts, for bench/step_split.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agent_core.llm.cpu import cpu_name
from agent_core.llm.quantized import Quantized

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <cstdint>
#ifdef __AVX2__
#include <immintrin.h>
#endif

// y[m, n] = dot(x[m], w[n]) (+ bias[n]) for x [M, K] and w [N, K], fp32 and contiguous.
// Each weight row is read from memory once and used for every row of x while in cache.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous());
    TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1) && w.scalar_type() == torch::kFloat && w.is_contiguous());
    const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    // OpenMP directly: at::parallel_for compiled into an extension ran 4x slower here.
    // The thread count is the calling thread's (torch.set_num_threads on that thread).
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float* row = wp + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float* xr = xp + m * K;
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int64_t k = 0; k < K; k++) acc += row[k] * xr[k];
            yp[m * N + n] = acc;
        }
    }
    if (bias.has_value()) y.add_(bias.value());
    return y;
}

// The quantized weights (agent_core/llm/quantized.py), groups of 32 along K:
//   int8: w = scale * q,            q int8 [N, K]
//   int4: w = scale * q + minimum,  q uint8 [N, K/2]; in each group's 16 bytes, byte j
//         holds element j in its low nibble and element j + 16 in its high nibble
// Each group is turned back into fp32 in registers once and used for every row of x.
static const int64_t GROUP = 32;
static const int64_t CHUNK = 8;  // rows of x per pass over a weight row

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline __m256 bytes_u8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
static inline __m256 bytes_i8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
#endif

static void check_blocks(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                         int64_t per_group) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous());
    TORCH_CHECK(x.size(1) % GROUP == 0 && q.dim() == 2 && q.is_contiguous());
    TORCH_CHECK(q.size(1) == x.size(1) / GROUP * per_group);
    TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous());
    TORCH_CHECK(scale.size(0) == q.size(0) && scale.size(1) == x.size(1) / GROUP);
}


#ifdef __AVX2__
// One weight row n against M rows of x, the group turned into fp32 by ``load``; C
// accumulators per row of x, so that the FMAs of one row do not wait on each other.
template <int M, typename Load>
static inline void dot_rows(const Load& load, int64_t G, const float* xp, int64_t K, float* yp, int64_t N, int64_t n) {
    constexpr int C = M >= 4 ? 1 : 4 / M;
    __m256 acc[M][C];
    for (int m = 0; m < M; m++)
        for (int c = 0; c < C; c++) acc[m][c] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 w[4];
        load(g, w);
        for (int m = 0; m < M; m++) {
            const float* xr = xp + m * K + g * GROUP;
            for (int i = 0; i < 4; i++)
                acc[m][i % C] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xr + 8 * i), acc[m][i % C]);
        }
    }
    for (int m = 0; m < M; m++) {
        __m256 sum = acc[m][0];
        for (int c = 1; c < C; c++) sum = _mm256_add_ps(sum, acc[m][c]);
        yp[m * N + n] = hsum(sum);
    }
}

template <typename Load>
static inline void dot_any(int64_t M, const Load& load, int64_t G, const float* xp, int64_t K, float* yp,
                           int64_t N, int64_t n) {
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
        const float* x = xp + m0 * K;
        float* y = yp + m0 * N;
        switch (std::min(CHUNK, M - m0)) {
            case 1: dot_rows<1>(load, G, x, K, y, N, n); break;
            case 2: dot_rows<2>(load, G, x, K, y, N, n); break;
            case 3: dot_rows<3>(load, G, x, K, y, N, n); break;
            case 4: dot_rows<4>(load, G, x, K, y, N, n); break;
            case 5: dot_rows<5>(load, G, x, K, y, N, n); break;
            case 6: dot_rows<6>(load, G, x, K, y, N, n); break;
            case 7: dot_rows<7>(load, G, x, K, y, N, n); break;
            default: dot_rows<8>(load, G, x, K, y, N, n);
        }
    }
}
#else
// Without AVX2: one group at a time turned into fp32 by ``load`` (float w[GROUP]), then
// a dot product with each row of x.
template <typename Load>
static inline void dot_any(int64_t M, const Load& load, int64_t G, const float* xp, int64_t K, float* yp,
                           int64_t N, int64_t n) {
    float w[GROUP];
    for (int64_t m = 0; m < M; m++) yp[m * N + n] = 0.f;
    for (int64_t g = 0; g < G; g++) {
        load(g, w);
        for (int64_t m = 0; m < M; m++) {
            const float* xr = xp + m * K + g * GROUP;
            float a = 0.f;
            #pragma omp simd reduction(+:a)
            for (int64_t j = 0; j < GROUP; j++) a += w[j] * xr[j];
            yp[m * N + n] += a;
        }
    }
}
#endif

torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
    check_blocks(x, q, scale, GROUP);
    TORCH_CHECK(q.scalar_type() == torch::kChar);
    const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / GROUP;
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const int8_t* qp = q.data_ptr<int8_t>();
    const float* sp = scale.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* row = qp + n * K;
        const float* s = sp + n * G;
#ifdef __AVX2__
        auto load = [row, s](int64_t g, __m256* w) {
            const __m256 sc = _mm256_set1_ps(s[g]);
            const __m128i lo = _mm_loadu_si128((const __m128i*)(row + g * GROUP));
            const __m128i hi = _mm_loadu_si128((const __m128i*)(row + g * GROUP + 16));
            w[0] = _mm256_mul_ps(bytes_i8(lo), sc);
            w[1] = _mm256_mul_ps(bytes_i8(_mm_srli_si128(lo, 8)), sc);
            w[2] = _mm256_mul_ps(bytes_i8(hi), sc);
            w[3] = _mm256_mul_ps(bytes_i8(_mm_srli_si128(hi, 8)), sc);
        };
#else
        auto load = [row, s](int64_t g, float* w) {
            for (int64_t j = 0; j < GROUP; j++) w[j] = s[g] * row[g * GROUP + j];
        };
#endif
        dot_any(M, load, G, xp, K, yp, N, n);
    }
    if (bias.has_value()) y.add_(bias.value());
    return y;
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor q, torch::Tensor scale, torch::Tensor minimum,
                        c10::optional<torch::Tensor> bias) {
    check_blocks(x, q, scale, GROUP / 2);
    TORCH_CHECK(q.scalar_type() == torch::kByte);
    TORCH_CHECK(minimum.scalar_type() == torch::kFloat && minimum.is_contiguous() && minimum.sizes() == scale.sizes());
    const int64_t M = x.size(0), K = x.size(1), N = q.size(0), G = K / GROUP;
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const uint8_t* qp = q.data_ptr<uint8_t>();
    const float* sp = scale.data_ptr<float>();
    const float* mp = minimum.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* row = qp + n * (K / 2);
        const float* s = sp + n * G;
        const float* mn = mp + n * G;
#ifdef __AVX2__
        auto load = [row, s, mn](int64_t g, __m256* w) {
            const __m128i low = _mm_set1_epi8(0x0F);
            const __m256 sc = _mm256_set1_ps(s[g]), mv = _mm256_set1_ps(mn[g]);
            const __m128i raw = _mm_loadu_si128((const __m128i*)(row + g * 16));
            const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            w[0] = _mm256_fmadd_ps(bytes_u8(lo), sc, mv);
            w[1] = _mm256_fmadd_ps(bytes_u8(_mm_srli_si128(lo, 8)), sc, mv);
            w[2] = _mm256_fmadd_ps(bytes_u8(hi), sc, mv);
            w[3] = _mm256_fmadd_ps(bytes_u8(_mm_srli_si128(hi, 8)), sc, mv);
        };
#else
        auto load = [row, s, mn](int64_t g, float* w) {
            const uint8_t* b = row + g * 16;
            for (int64_t j = 0; j < 16; j++) {
                w[j] = s[g] * (b[j] & 15) + mn[g];
                w[j + 16] = s[g] * (b[j] >> 4) + mn[g];
            }
        };
#endif
        dot_any(M, load, G, xp, K, yp, N, n);
    }
    if (bias.has_value()) y.add_(bias.value());
    return y;
}
// One decode step's attention for rows 0..R-1, one new token each: the rotary angles on
// the new queries and keys (x * cos + roll(x, D/2) * sin, with sin's first half negated,
// as BatchDecoder has them), the new key and value written into each row's cache at its
// position, then every head's attention over its row's cache up to that position.
// qkv [R, 1, (H + 2 KV) D]; cos, sin [R, 1, 1, D]; keys, values [slots, KV, capacity, D];
// positions int64 [R]. Returns [R, 1, H D].
torch::Tensor attend(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor keys,
                     torch::Tensor values, torch::Tensor positions, int64_t heads, int64_t kv_heads) {
    TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && keys.is_contiguous()
                && values.is_contiguous() && positions.is_contiguous());
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat && keys.scalar_type() == torch::kFloat
                && values.scalar_type() == torch::kFloat && positions.scalar_type() == torch::kLong);
    const int64_t R = qkv.size(0), KV = kv_heads, H = heads, C = keys.size(2), D = keys.size(3), half = D / 2;
    TORCH_CHECK(keys.size(1) == KV && H % KV == 0 && qkv.size(-1) == (H + 2 * KV) * D && keys.size(0) >= R);
    TORCH_CHECK(cos.numel() == R * D && sin.numel() == R * D && positions.numel() == R);
    TORCH_CHECK(values.sizes() == keys.sizes());
    const int64_t group = H / KV;
    const float scale = 1.0f / std::sqrt((float)D);
    auto out = torch::empty({R, 1, H * D}, qkv.options());
    auto rotated = torch::empty({R, H, D}, qkv.options());
    const float* src = qkv.data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t* pp = positions.data_ptr<int64_t>();
    float* kp = keys.data_ptr<float>();
    float* vp = values.data_ptr<float>();
    float* qp = rotated.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t r = 0; r < R; r++) {
        TORCH_CHECK(pp[r] >= 0 && pp[r] < C, "a position past the cache");
        const float* row = src + r * (H + 2 * KV) * D;
        const float* c = cp + r * D;
        const float* s = sp + r * D;
        auto rotate = [c, s, half, D](const float* x, float* y) {
            for (int64_t j = 0; j < D; j++) y[j] = x[j] * c[j] + x[(j + half) % D] * s[j];
        };
        for (int64_t h = 0; h < H; h++) rotate(row + h * D, qp + (r * H + h) * D);
        for (int64_t k = 0; k < KV; k++) {
            const int64_t at = ((r * KV + k) * C + pp[r]) * D;
            rotate(row + (H + k) * D, kp + at);
            std::copy(row + (H + KV + k) * D, row + (H + KV + k + 1) * D, vp + at);
        }
    }
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        for (int64_t h = 0; h < H; h++) {
            const int64_t n = pp[r] + 1;
            const float* q = qp + (r * H + h) * D;
            const float* K = kp + (r * KV + h / group) * C * D;
            const float* V = vp + (r * KV + h / group) * C * D;
            std::vector<float> w(n);
            float top = -INFINITY;
            for (int64_t t = 0; t < n; t++) {
                float dot = 0.0f;
                for (int64_t j = 0; j < D; j++) dot += q[j] * K[t * D + j];
                w[t] = dot * scale;
                top = std::max(top, w[t]);
            }
            float total = 0.0f;
            for (int64_t t = 0; t < n; t++) {
                w[t] = std::exp(w[t] - top);
                total += w[t];
            }
            float* o = op + (r * H + h) * D;
            std::fill(o, o + D, 0.0f);
            for (int64_t t = 0; t < n; t++) {
                const float p = w[t] / total;
                for (int64_t j = 0; j < D; j++) o[j] += p * V[t * D + j];
            }
        }
    }
    return out;
}

// --- one decode step in one call --------------------------------------------------------
// Every layer of the model for rows 0..R-1, one new token each, without returning to
// Python: the RMS norms, the projections (int4 or int8 blocks, or fp32 weights, by the
// loops above), each row's own LoRA products, the attention (``attend``), the SiLU MLP
// and the residual sums; then the final norm and the LM head. ``timing``: add each
// part's seconds to ``step_seconds`` (matmuls, attention, adapters, rest).
using Opt = c10::optional<torch::Tensor>;
static double step_seconds[4] = {0, 0, 0, 0};
static bool timing = false;

static inline double now() { return omp_get_wtime(); }

// A projection as BatchDecoder holds it: [q, scale, minimum, weight, bias], absent ones None.
static torch::Tensor dense(const torch::Tensor& x, const std::vector<Opt>& d) {
    if (d[2].has_value()) return gemv_int4(x, *d[0], *d[1], *d[2], d[4]);
    if (d[1].has_value()) return gemv_int8(x, *d[0], *d[1], d[4]);
    return gemv(x, *d[3], d[4]);
}

static torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
    const int64_t R = x.size(0), H = x.size(1);
    auto y = torch::empty_like(x);
    const float* xp = x.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t r = 0; r < R; r++) {
        const float* xr = xp + r * H;
        float squares = 0.f;
        for (int64_t j = 0; j < H; j++) squares += xr[j] * xr[j];
        const float k = 1.0f / std::sqrt(squares / H + (float)eps);
        for (int64_t j = 0; j < H; j++) yp[r * H + j] = xr[j] * k * wp[j];
    }
    return y;
}

static torch::Tensor silu_mul(const torch::Tensor& gate_up) {
    const int64_t R = gate_up.size(0), I = gate_up.size(1) / 2;
    auto y = torch::empty({R, I}, gate_up.options());
    const float* gp = gate_up.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < I; j++) {
            const float g = gp[r * 2 * I + j];
            yp[r * I + j] = g / (1.0f + std::exp(-g)) * gp[r * 2 * I + I + j];
        }
    return y;
}

// out[row, offset:offset + size] += (x[row] A[row]) B[row] for each of ``rows`` (those with
// an adapter), A [slots, in, rank], B [slots, rank, size]: plain loops, a few microseconds
// where two batched matmuls cost their dispatch twice per projection.
static void lora(torch::Tensor& out, const torch::Tensor& x, const Opt& a, const Opt& b, int64_t offset,
                 const std::vector<int64_t>& rows) {
    if (!a.has_value()) return;
    TORCH_CHECK(a->is_contiguous() && b->is_contiguous() && a->scalar_type() == torch::kFloat);
    const int64_t in = x.size(1), rank = a->size(2), size = b->size(2), N = out.size(1);
    TORCH_CHECK(a->size(1) == in && b->size(1) == rank && offset + size <= N);
    const float* xp = x.data_ptr<float>();
    const float* ap = a->data_ptr<float>();
    const float* bp = b->data_ptr<float>();
    float* op = out.data_ptr<float>();
    std::vector<float> t(rank);
    for (const int64_t r : rows) {
        std::fill(t.begin(), t.end(), 0.f);
        const float* xr = xp + r * in;
        const float* A = ap + r * in * rank;
        for (int64_t i = 0; i < in; i++) {
            const float xi = xr[i];
            for (int64_t j = 0; j < rank; j++) t[j] += xi * A[i * rank + j];
        }
        float* o = op + r * N + offset;
        const float* B = bp + r * rank * size;
        for (int64_t j = 0; j < rank; j++) {
            const float tj = t[j];
            for (int64_t k = 0; k < size; k++) o[k] += tj * B[j * size + k];
        }
    }
}

torch::Tensor decode_step(torch::Tensor x, std::vector<torch::Tensor> norms, double eps,
                          std::vector<std::vector<Opt>> denses, std::vector<Opt> adapters, std::vector<int64_t> adapted,
                          std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, torch::Tensor cos,
                          torch::Tensor sin, torch::Tensor positions, int64_t heads, int64_t kv_heads) {
    const int64_t L = keys.size(), R = x.size(0), D = keys[0].size(3);
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat);
    TORCH_CHECK((int64_t)norms.size() == 2 * L + 1 && (int64_t)denses.size() == 4 * L + 1);
    TORCH_CHECK(adapters.empty() || (int64_t)adapters.size() == 14 * L, "adapters: A and B of 7 projections a layer");
    for (const int64_t r : adapted) TORCH_CHECK(r >= 0 && r < R, "an adapted row past the batch");
    const int64_t q_size = heads * D, kv_size = kv_heads * D;
    double parts[4] = {0, 0, 0, 0};
    double mark = now();
    auto lap = [&](int part) {
        if (!timing) return;
        const double t = now();
        parts[part] += t - mark;
        mark = t;
    };
    auto adapt = [&](torch::Tensor& out, const torch::Tensor& in, int64_t layer, int64_t first, int64_t count,
                     const int64_t* offsets) {
        if (adapters.empty()) return;
        for (int64_t i = 0; i < count; i++) {
            const int64_t at = 2 * (7 * layer + first + i);
            lora(out, in, adapters[at], adapters[at + 1], offsets[i], adapted);
        }
        lap(2);
    };
    auto h = x.clone();
    for (int64_t l = 0; l < L; l++) {
        auto n = rms_norm(h, norms[2 * l], eps);
        lap(3);
        auto qkv = dense(n, denses[4 * l]);
        lap(0);
        const int64_t qkv_at[3] = {0, q_size, q_size + kv_size};
        adapt(qkv, n, l, 0, 3, qkv_at);
        auto a = attend(qkv.view({R, 1, -1}), cos, sin, keys[l], values[l], positions, heads, kv_heads).view({R, -1});
        lap(1);
        auto o = dense(a, denses[4 * l + 1]);
        lap(0);
        const int64_t zero[1] = {0};
        adapt(o, a, l, 3, 1, zero);
        h.add_(o);
        n = rms_norm(h, norms[2 * l + 1], eps);
        lap(3);
        auto gate_up = dense(n, denses[4 * l + 2]);
        lap(0);
        const int64_t gate_up_at[2] = {0, gate_up.size(1) / 2};
        adapt(gate_up, n, l, 4, 2, gate_up_at);
        auto m = silu_mul(gate_up);
        lap(3);
        auto down = dense(m, denses[4 * l + 3]);
        lap(0);
        adapt(down, m, l, 6, 1, zero);
        h.add_(down);
        lap(3);
    }
    auto logits = dense(rms_norm(h, norms[2 * L], eps), denses[4 * L]);
    lap(0);
    if (timing)
        for (int i = 0; i < 4; i++) step_seconds[i] += parts[i];
    return logits;
}

// Turn the per-part timing of decode_step on or off; the seconds so far (matmuls,
// attention, adapters, rest), which then start again from 0.
std::vector<double> step_timing(bool on) {
    timing = on;
    std::vector<double> out(step_seconds, step_seconds + 4);
    for (int i = 0; i < 4; i++) step_seconds[i] = 0;
    return out;
}
"""


class Gemv:
    """The compiled loops: ``gemv(x, weight, bias)`` on an fp32 weight [out, in], and
    ``gemv.blocks(x, quantized, bias)`` on int8 or int4 blocks (:mod:`agent_core.llm.quantized`)."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._module.gemv(x, weight, bias)  # type: ignore[no-any-return]

    def blocks(self, x: torch.Tensor, weight: Quantized, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.layout == "int8":
            return self._module.gemv_int8(x, weight.q, weight.scale, bias)  # type: ignore[no-any-return]
        return self._module.gemv_int4(x, weight.q, weight.scale, weight.minimum, bias)  # type: ignore[no-any-return]

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
               values: torch.Tensor, positions: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:  # fmt: skip
        """One decode step's attention in one call: rotary, cache writes, attention (see SOURCE)."""
        return self._module.attend(qkv, cos, sin, keys, values, positions, heads, kv_heads)  # type: ignore[no-any-return]

    def decode_step(self, *args: Any) -> torch.Tensor:
        """Every layer of one decode step in one call (``decode_step`` in SOURCE; its
        arguments are :meth:`agent_core.llm.decoder.BatchDecoder._decode_compiled`'s)."""
        return self._module.decode_step(*args)  # type: ignore[no-any-return]

    def step_timing(self, on: bool) -> list[float]:
        """Time the parts of each ``decode_step`` from now (``on``) or not; the seconds so
        far spent on matmuls, attention, adapters and the rest, which start again from 0."""
        return list(self._module.step_timing(on))


_loaded: dict[Path, Gemv | None] = {}
FUNCTIONS = ["gemv", "gemv_int8", "gemv_int4", "attend", "decode_step", "step_timing"]
PATHS = ("gemv", "onednn", "linear")
# The batch sizes timed: decode steps of 1, 2 and 8 users, and 64 for reading a prompt in.
# A batch uses the choice of the smallest of these it fits (a longer prompt: 64's).
ROWS = (1, 2, 8, 64)


def gemv(kernels_dir: Path) -> Gemv | None:
    """The compiled ``gemv(x, w, bias)``: loaded if it was built before (no compiler
    then), else built now under ``kernels_dir``; None (and one warning) if it cannot be
    built here."""
    if kernels_dir not in _loaded:
        _loaded[kernels_dir] = _load(kernels_dir) if built(kernels_dir) else _build(kernels_dir)
    return _loaded[kernels_dir]


def built(kernels_dir: Path) -> bool:
    """Whether ``gemv`` was built for this torch and this source under ``kernels_dir``."""
    return (_folder(kernels_dir) / f"{MODULE}.so").is_file()


MODULE = "attune_gemv"


def _flags() -> list[str] | None:
    """The compiler flags for this CPU; None where the loop would not be fast (no AVX2)."""
    flags = ["-O3", "-ffast-math", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return None
        flags += ["-mavx2", "-mfma"]
    return flags


def _folder(kernels_dir: Path) -> Path:
    """One build folder per torch version and source: a build found there is one this
    process can load as it is (a cache copied from elsewhere or an older torch is not
    rebuilt in place on the start-up path)."""
    digest = hashlib.sha256(f"{SOURCE}{_flags()}{platform.machine()}".encode()).hexdigest()[:12]
    return kernels_dir / f"gemv-torch{torch.__version__}-{digest}"


def _load(kernels_dir: Path) -> Gemv | None:
    import importlib.util

    path = _folder(kernels_dir) / f"{MODULE}.so"
    try:
        spec = importlib.util.spec_from_file_location(MODULE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return Gemv(module) if all(hasattr(module, f) for f in FUNCTIONS) else None
    except Exception as exc:  # a damaged file: build it again
        log.warning("could not load the decoding kernel %s (%s); building it again", path, exc)
        path.unlink(missing_ok=True)
        return _build(kernels_dir)


def _build(kernels_dir: Path) -> Gemv | None:
    import fcntl

    flags = _flags()
    if flags is None:
        log.warning("no AVX2 on this CPU: the compiled gemv is left out")
        return None
    folder = _folder(kernels_dir)
    try:
        from torch.utils.cpp_extension import load_inline

        _ninja_on_path()
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "attune.lock", "w") as held:
            # One build at a time, and a lock that dies with its process: torch's own
            # "lock" file stays behind when a build is killed and makes the next wait forever.
            fcntl.flock(held, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
            if not (folder / f"{MODULE}.so").is_file():
                log.info("building the decoding kernel into %s (once, 25-45 s; replies do not wait for it)", folder)
            module = load_inline(name=MODULE, cpp_sources=SOURCE, functions=FUNCTIONS, extra_cflags=flags,
                                 extra_ldflags=["-fopenmp"], build_directory=str(folder))  # fmt: skip
    except Exception as exc:  # no compiler, no ninja, a read-only cache...
        log.warning("could not build the decoding kernel (%s); it is left out", exc)
        return None
    return Gemv(module)


def _ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH; the ninja wheel puts it beside this Python,
    which is not on PATH when the virtual environment is used without activating it."""
    here = str(Path(sys.executable).parent)
    if shutil.which("ninja") is None and here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


@dataclass(frozen=True)
class KernelChoice:
    """The matmul path for each batch size, and how it was decided."""

    by_rows: dict[int, str]  # {1: "gemv", 2: "gemv", 8: "onednn", 64: "onednn"}: ROWS -> a path
    how: str  # "measured", "cached" (measured on this machine before) or "forced" ([llm.local] kernel)
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # path -> rows -> one pass of every layer
    final: bool = True  # False while the compiled gemv is still being built: the choice is made again then

    def path(self, rows: int) -> str:
        return next((self.by_rows[r] for r in ROWS if rows <= r), self.by_rows[ROWS[-1]])

    def describe(self) -> str:
        chosen = ", ".join(f"{r} row{'s' * (r > 1)}: {p}" for r, p in self.by_rows.items())
        return f"{chosen} ({self.how}{'' if self.final else ', gemv still building'})"

    def as_dict(self) -> dict[str, Any]:
        return {"by_rows": {str(r): p for r, p in self.by_rows.items()}, "how": self.how, "final": self.final,
                "timings_ms": {p: {str(r): t for r, t in t_.items()} for p, t_ in self.timings_ms.items()}}  # fmt: skip


Run = Callable[[str, torch.Tensor, int], torch.Tensor]  # (path, x, layer) -> that layer's output by that path


def choose(
    run: Run, in_features: Sequence[int], paths: Sequence[str], *, cache: Path | None, shapes: str, final: bool,
    trials: int = 3,
) -> KernelChoice:  # fmt: skip
    """Time one pass over every layer (``run(path, x, layer)`` for each) by each of
    ``paths`` at each of :data:`ROWS` rows, after checking that path's outputs against
    ``F.linear``'s ("linear"); keep the fastest per row count. ``cache``: the kernels
    folder, where the answer is kept for the next start on this machine."""
    key = _cache_key(paths, shapes)
    cached = _read_cache(cache, key)
    if cached is not None:
        return KernelChoice({int(r): p for r, p in cached["by_rows"].items()}, "cached",
                            {p: {int(r): t for r, t in v.items()} for p, v in cached["timings_ms"].items()},
                            final)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    timings: dict[str, dict[int, float]] = {}
    # A choice for the while the compiled gemv builds (final False) is made quickly, on the
    # first start's path to its first reply: 1 and 8 rows timed once (2 takes 1's, 64 8's).
    sizes, trials = (ROWS, trials) if final else ((1, 8), 1)
    for path in paths:
        if path != "linear" and not _agrees(run, path, in_features, generator):
            log.warning("the %s matmul path disagrees with F.linear here; it is not used", path)
            continue
        timings[path] = {}
        for rows in sizes:
            xs = [torch.randn(rows, k, generator=generator) for k in in_features]
            long = rows > ROWS[-2]  # a prompt's rows: slow enough to time once, after no warm-up
            if not long:
                for layer, x in enumerate(xs):  # warm: first calls allocate and fill caches
                    run(path, x, layer)
            best = float("inf")
            for _ in range(1 if long else trials):
                started = time.perf_counter()
                for layer, x in enumerate(xs):
                    run(path, x, layer)
                best = min(best, time.perf_counter() - started)
            timings[path][rows] = round(best * 1000, 3)
    nearest = {rows: max((r for r in sizes if r <= rows), default=sizes[0]) for rows in ROWS}
    by_rows = {rows: min(timings, key=lambda p: timings[p][nearest[rows]]) for rows in ROWS}
    choice = KernelChoice(by_rows, "measured", timings, final)
    if final:
        _write_cache(cache, key, choice)
    return choice


def _agrees(run: Run, path: str, in_features: Sequence[int], generator: torch.Generator) -> bool:
    for layer in (0, len(in_features) - 1):
        for rows in (1, 3):
            x = torch.randn(rows, in_features[layer], generator=generator)
            try:
                got, want = run(path, x, layer), run("linear", x, layer)
            except Exception as exc:
                log.warning("the %s matmul path failed here (%s)", path, exc)
                return False
            scale = float(want.abs().max()) or 1.0
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * scale):
                return False
    return True


def _cache_key(paths: Sequence[str], shapes: str) -> str:
    layers = hashlib.sha256(shapes.encode()).hexdigest()[:16]
    parts = [cpu_name(), torch.backends.cpu.get_cpu_capability(), torch.__version__,
             f"threads {torch.get_num_threads()}", ",".join(paths), layers]  # fmt: skip
    return " | ".join(parts)


def _read_cache(cache: Path | None, key: str) -> dict[str, Any] | None:
    if cache is None:
        return None
    try:
        entry = json.loads((cache / "choice.json").read_text(encoding="utf-8")).get(key)
        if entry and set(entry["by_rows"]) == {str(r) for r in ROWS}:
            return dict(entry)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    return None


def _write_cache(cache: Path | None, key: str, choice: KernelChoice) -> None:
    if cache is None:
        return
    path = cache / "choice.json"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        entry = choice.as_dict()
        known[key] = {"by_rows": entry["by_rows"], "timings_ms": entry["timings_ms"]}
        tmp = path.with_name(f".choice.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache: measured again next time
        log.warning("could not keep the kernel choice in %s (%s)", path, exc)
