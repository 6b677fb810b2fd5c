// Multi-head attention in one operator for the CPU (fp32, AVX2 + FMA): softmax(q k^T * scale) v.
//
// Paddle runs attention on the CPU as two matmuls and a softmax; at 512 px the scores of one UNet
// self-attention are 1 GiB, so every pass over them runs from main memory (bench/NOTES.md). Here a
// task is 24 queries of one head: their scores (384 KiB at 4096 keys) stay in the core's L2 cache
// from the product with the keys, through the softmax, to the product with the values, and the task
// reads each head's keys and values once. The products are register-blocked: 6 queries by 16 keys,
// or by 16 channels of the values, accumulate in 12 AVX registers.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "paddle/extension.h"

namespace {

constexpr int kRows = 6;         // queries per register block
constexpr int kPanel = 16;       // keys, or channels of the values, per register block: two AVX registers
constexpr int kTaskRows = 24;    // queries per task
constexpr int kKeyBlock = 256;   // keys per pass of the value products: their values stay in L1

struct AlignedBuffer {
  float* data;
  explicit AlignedBuffer(size_t count)
      : data(static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64))) {}
  ~AlignedBuffer() { std::free(data); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

// Calls f(std::integral_constant<int, rows>) for rows in 1..6, so that register blocks are unrolled.
template <typename F>
void with_rows(int rows, F&& f) {
  switch (rows) {
    case 6: return f(std::integral_constant<int, 6>());
    case 5: return f(std::integral_constant<int, 5>());
    case 4: return f(std::integral_constant<int, 4>());
    case 3: return f(std::integral_constant<int, 3>());
    case 2: return f(std::integral_constant<int, 2>());
    default: return f(std::integral_constant<int, 1>());
  }
}

// exp(x) for x <= 0 (scores minus their row's maximum), as Cephes' expf: 2^n * p(r), |r| <= ln2/2.
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// scores[r][0..16) = q[r] . keys_panel[., 0..16) + padding for R queries; row_max[r] takes their maxima
// lane by lane.
template <int R>
void query_key_panel(const float* q, int q_stride, const float* keys_panel, int dim, __m256 pad0, __m256 pad1,
                     float* scores, int scores_stride, __m256* row_max) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r][0] = pad0;
    acc[r][1] = pad1;
  }
  for (int d = 0; d < dim; ++d) {
    const __m256 k0 = _mm256_load_ps(keys_panel + d * kPanel);
    const __m256 k1 = _mm256_load_ps(keys_panel + d * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 qr = _mm256_broadcast_ss(q + r * q_stride + d);
      acc[r][0] = _mm256_fmadd_ps(qr, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(qr, k1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(scores + r * scores_stride, acc[r][0]);
    _mm256_store_ps(scores + r * scores_stride + 8, acc[r][1]);
    row_max[r] = _mm256_max_ps(row_max[r], _mm256_max_ps(acc[r][0], acc[r][1]));
  }
}

// out[r][0..8W) += sum_j probs[r][j] * values[j][0..8W) over `keys` keys, for R queries.
template <int R, int W>
void probability_value_block(const float* probs, int probs_stride, const float* values, int keys, float* out) {
  __m256 acc[R][W];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int w = 0; w < W; ++w) acc[r][w] = _mm256_load_ps(out + r * kPanel + w * 8);
  for (int j = 0; j < keys; ++j) {
    __m256 v[W];
#pragma GCC unroll 2
    for (int w = 0; w < W; ++w) v[w] = _mm256_load_ps(values + j * kPanel + w * 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 pr = _mm256_broadcast_ss(probs + r * probs_stride + j);
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(pr, v[w], acc[r][w]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int w = 0; w < W; ++w) _mm256_store_ps(out + r * kPanel + w * 8, acc[r][w]);
}

// In place: scores -> exp((s - max) * scale) over the first `keys` entries; returns 1 / their sum.
float softmax_row(float* row, int keys, float scale, __m256 lane_max) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, lane_max);
  const float row_max = *std::max_element(lanes, lanes + 8);
  // (s - max) * scale, not s * scale - max * scale: s - max is exact for scores near the maximum.
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 vmax = _mm256_set1_ps(row_max);
  __m256 vsum = _mm256_setzero_ps();
  int j = 0;
  for (; j + 8 <= keys; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_sub_ps(_mm256_load_ps(row + j), vmax), vscale));
    _mm256_store_ps(row + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  _mm256_store_ps(lanes, vsum);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  for (; j < keys; ++j) {
    alignas(32) float one[8] = {(row[j] - row_max) * scale};
    _mm256_store_ps(one, exp_nonpositive(_mm256_load_ps(one)));
    row[j] = one[0];
    sum += one[0];
  }
  return 1.0f / sum;
}

// Attention for `rows` (at most kTaskRows) queries of one head. q and out: rows `stride` floats apart;
// keys packed as [panel][channel][16 keys], values as [chunk][key][16 channels], both zero-padded.
// scores: kTaskRows x scores_stride floats; sums: kTaskRows x 16 * chunks floats; both scratch.
void attend(int rows, const float* q, float* out, int stride, const float* packed_keys, const float* packed_values,
            int keys, int dim, float scale, float* scores, int scores_stride, float* sums) {
  const int panels = (keys + kPanel - 1) / kPanel;
  alignas(32) float padding[kPanel];  // added to the last panel: its padding keys must not count
  for (int c = 0; c < kPanel; ++c) padding[c] = (panels - 1) * kPanel + c < keys ? 0.0f : -INFINITY;
  __m256 row_max[kTaskRows];
  std::fill(row_max, row_max + rows, _mm256_set1_ps(-INFINITY));
  for (int p = 0; p < panels; ++p) {
    const bool last = p == panels - 1;
    const __m256 pad0 = last ? _mm256_load_ps(padding) : _mm256_setzero_ps();
    const __m256 pad1 = last ? _mm256_load_ps(padding + 8) : _mm256_setzero_ps();
    for (int r = 0; r < rows; r += kRows) {
      with_rows(std::min(kRows, rows - r), [&](auto R) {
        query_key_panel<R>(q + r * stride, stride, packed_keys + static_cast<size_t>(p) * dim * kPanel, dim, pad0,
                           pad1, scores + r * scores_stride + p * kPanel, scores_stride, row_max + r);
      });
    }
  }
  float inverse_sums[kTaskRows];
  for (int r = 0; r < rows; ++r) inverse_sums[r] = softmax_row(scores + r * scores_stride, keys, scale, row_max[r]);

  for (int c0 = 0; c0 < dim; c0 += kPanel) {
    const float* values = packed_values + static_cast<size_t>(c0 / kPanel) * keys * kPanel;
    std::fill(sums, sums + rows * kPanel, 0.0f);
    for (int j0 = 0; j0 < keys; j0 += kKeyBlock) {
      const int block = std::min(kKeyBlock, keys - j0);
      for (int r = 0; r < rows; r += kRows) {
        with_rows(std::min(kRows, rows - r), [&](auto R) {
          const float* probs = scores + r * scores_stride + j0;
          if (dim - c0 > 8) {
            probability_value_block<R, 2>(probs, scores_stride, values + j0 * kPanel, block, sums + r * kPanel);
          } else {
            probability_value_block<R, 1>(probs, scores_stride, values + j0 * kPanel, block, sums + r * kPanel);
          }
        });
      }
    }
    const int width = std::min(kPanel, dim - c0);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < width; ++c) out[r * stride + c0 + c] = sums[r * kPanel + c] * inverse_sums[r];
  }
}

}  // namespace

std::vector<paddle::Tensor> AttentionForward(const paddle::Tensor& q, const paddle::Tensor& k,
                                             const paddle::Tensor& v, int heads, float scale) {
  PD_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu(), "attention_cpu runs on the CPU");
  PD_CHECK(q.dtype() == paddle::DataType::FLOAT32 && k.dtype() == paddle::DataType::FLOAT32 &&
               v.dtype() == paddle::DataType::FLOAT32, "attention_cpu takes float32");
  PD_CHECK(q.shape().size() == 3 && k.shape().size() == 3 && v.shape().size() == 3,
           "attention_cpu takes q, k, v as [batch, length, heads * channels]");
  const int batch = q.shape()[0], queries = q.shape()[1], inner = q.shape()[2], keys = k.shape()[1];
  PD_CHECK(inner % heads == 0 && k.shape()[2] == inner && v.shape()[2] == inner && k.shape()[0] == batch &&
               v.shape()[0] == batch && v.shape()[1] == keys, "attention_cpu: q, k, v shapes do not match");
  PD_CHECK(keys > 0, "attention_cpu: no keys");
  const int dim = inner / heads;
  const int panels = (keys + kPanel - 1) / kPanel;
  const int chunks = (dim + kPanel - 1) / kPanel;

  // Views (slices, transposes) arrive strided in eager mode.
  const paddle::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const float* qd = qc.data<float>();
  const float* kd = kc.data<float>();
  const float* vd = vc.data<float>();
  paddle::Tensor out = paddle::empty(q.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  float* od = out.data<float>();

  // Keys packed per head as [panel][channel][16 keys], values as [chunk][key][16 channels], zero-padded.
  const size_t keys_per_head = static_cast<size_t>(panels) * dim * kPanel;
  const size_t values_per_head = static_cast<size_t>(chunks) * keys * kPanel;
  AlignedBuffer packed_keys(batch * heads * keys_per_head), packed_values(batch * heads * values_per_head);
#pragma omp parallel for collapse(2)
  for (int b = 0; b < batch; ++b) {
    for (int h = 0; h < heads; ++h) {
      float* pk = packed_keys.data + (b * heads + h) * keys_per_head;
      float* pv = packed_values.data + (b * heads + h) * values_per_head;
      std::memset(pk, 0, keys_per_head * sizeof(float));
      std::memset(pv, 0, values_per_head * sizeof(float));
      for (int j = 0; j < keys; ++j) {
        const float* krow = kd + (static_cast<size_t>(b) * keys + j) * inner + h * dim;
        const float* vrow = vd + (static_cast<size_t>(b) * keys + j) * inner + h * dim;
        float* kpanel = pk + static_cast<size_t>(j / kPanel) * dim * kPanel + j % kPanel;
        for (int d = 0; d < dim; ++d) kpanel[d * kPanel] = krow[d];
        for (int d = 0; d < dim; ++d) pv[(static_cast<size_t>(d / kPanel) * keys + j) * kPanel + d % kPanel] = vrow[d];
      }
    }
  }

  const int blocks = (queries + kTaskRows - 1) / kTaskRows;
  const int tasks = batch * heads * blocks;
  // One panel more than the keys need: rows 4096 floats apart would share the L1 cache's sets.
  const int scores_stride = (panels + 1) * kPanel;
#pragma omp parallel
  {
    AlignedBuffer scores(static_cast<size_t>(kTaskRows) * scores_stride), sums(kTaskRows * kPanel);
#pragma omp for schedule(static)
    for (int task = 0; task < tasks; ++task) {
      const int b = task / (heads * blocks), h = task / blocks % heads, block = task % blocks;
      const int first = block * kTaskRows, rows = std::min(queries - first, kTaskRows);
      const size_t offset = (static_cast<size_t>(b) * queries + first) * inner + h * dim;
      attend(rows, qd + offset, od + offset, inner, packed_keys.data + (b * heads + h) * keys_per_head,
             packed_values.data + (b * heads + h) * values_per_head, keys, dim, scale, scores.data, scores_stride,
             sums.data);
    }
  }
  return {out};
}

std::vector<std::vector<int64_t>> AttentionInferShape(const std::vector<int64_t>& q, const std::vector<int64_t>& k,
                                                      const std::vector<int64_t>& v) {
  return {q};
}

std::vector<paddle::DataType> AttentionInferDtype(const paddle::DataType& q, const paddle::DataType& k,
                                                  const paddle::DataType& v) {
  return {q};
}

PD_BUILD_OP(attention_cpu)
    .Inputs({"Q", "K", "V"})
    .Outputs({"Out"})
    .Attrs({"heads: int", "scale: float"})
    .SetKernelFn(PD_KERNEL(AttentionForward))
    .SetInferShapeFn(PD_INFER_SHAPE(AttentionInferShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(AttentionInferDtype));
