// The transforms of csrc/winograd_cpu.cpp, included there once for each instruction set (in a namespace of its own,
// under `#pragma GCC target`): GCC's vector extensions below become one AVX-512 register of 16 channels only in code
// compiled for it. Each transform takes the same sums in the same order as the formulas in winograd_cpu.cpp, one
// channel per lane, and multiplies only by powers of two (exact, so that a fused multiply-add, where the
// instruction set has one, rounds as the separate operations do): every instruction set gives the same numbers.

typedef float Floats __attribute__((vector_size(kBlock * sizeof(float))));

// `width` (<= kBlock) channels from `from`; the lanes beyond them are zero.
inline Floats load(const float* from, int64_t width) {
  Floats v = {};
  if (width == kBlock) {
    std::memcpy(&v, from, sizeof(v));
  } else {
    std::memcpy(&v, from, width * sizeof(float));
  }
  return v;
}

inline void store(float* to, const Floats& v, int64_t width) {
  if (width == kBlock) {
    std::memcpy(to, &v, sizeof(v));
  } else {
    std::memcpy(to, &v, width * sizeof(float));
  }
}

// B^T x of F(2, 3) for the 4 inputs x[0], x[stride], ...: B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
inline void input_transform(const Floats* x, int stride, Floats* out, int out_stride, std::integral_constant<int, 2>) {
  const Floats d0 = x[0], d1 = x[stride], d2 = x[2 * stride], d3 = x[3 * stride];
  out[0] = d0 - d2;
  out[out_stride] = d1 + d2;
  out[2 * out_stride] = d2 - d1;
  out[3 * out_stride] = d1 - d3;
}

// B^T x of F(4, 3) for the 6 inputs, by rows 4 d0 - 5 d2 + d4 = 4 (d0 - d2) + (d4 - d2), ...:
//   B^T = [4 0 -5 0 1 0; 0 4 4 -1 -1 0; 0 -4 4 1 -1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
inline void input_transform(const Floats* x, int stride, Floats* out, int out_stride, std::integral_constant<int, 4>) {
  const Floats d0 = x[0], d1 = x[stride], d2 = x[2 * stride], d3 = x[3 * stride], d4 = x[4 * stride],
               d5 = x[5 * stride];
  const Floats odd = 4.0f * d1 - d3, even = 4.0f * d2 - d4;  // t1, t2 = +-(4 d1 - d3) + (4 d2 - d4)
  const Floats step = 2.0f * (d3 - d1), rise = d4 - d2;      // t3, t4 = +-2 (d3 - d1) + (d4 - d2)
  out[0] = 4.0f * (d0 - d2) + rise;
  out[out_stride] = odd + even;
  out[2 * out_stride] = even - odd;
  out[3 * out_stride] = step + rise;
  out[4 * out_stride] = rise - step;
  out[5 * out_stride] = 4.0f * (d1 - d3) + (d5 - d3);
}

// A^T m of F(2, 3) for the 4 products m[0], m[stride], ...: A^T = [1 1 1 0; 0 1 -1 -1]
inline void output_transform(const Floats* m, int stride, Floats* out, int out_stride, std::integral_constant<int, 2>) {
  const Floats m0 = m[0], m1 = m[stride], m2 = m[2 * stride], m3 = m[3 * stride];
  out[0] = m0 + m1 + m2;
  out[out_stride] = m1 - m2 - m3;
}

// A^T m of F(4, 3) for the 6 products: A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
inline void output_transform(const Floats* m, int stride, Floats* out, int out_stride, std::integral_constant<int, 4>) {
  const Floats sum1 = m[stride] + m[2 * stride], diff1 = m[stride] - m[2 * stride];
  const Floats sum2 = m[3 * stride] + m[4 * stride], diff2 = m[3 * stride] - m[4 * stride];
  out[0] = m[0] + sum1 + sum2;
  out[out_stride] = diff1 + 2.0f * diff2;
  out[2 * out_stride] = sum1 + 4.0f * sum2;
  out[3 * out_stride] = diff1 + 8.0f * diff2 + m[5 * stride];
}

// V[p, tile, c] = (B^T d B)[p] for the N x N positions p of each tile's input block (N = M + 2: rows M ty - 1 ...
// M ty + M, zero outside the image), at v + p * layout.position + tile * layout.tile + c.
template <int M>
void input_tiles(const float* input, float* v, const Geometry& g, const Layout& layout, int64_t channels,
                 int64_t begin, int64_t end) {
  constexpr int N = M + 2;
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t image = tile / (g.tiles_h * g.tiles_w);
    const int64_t y0 = (tile / g.tiles_w) % g.tiles_h * M - 1;
    const int64_t x0 = tile % g.tiles_w * M - 1;
    const float* at[N][N];  // the block's pixels, nullptr outside the image
    for (int i = 0; i < N; ++i) {
      for (int j = 0; j < N; ++j) {
        const int64_t y = y0 + i, x = x0 + j;
        at[i][j] = y >= 0 && y < g.height && x >= 0 && x < g.width
                       ? input + ((image * g.height + y) * g.width + x) * channels
                       : nullptr;
      }
    }
    for (int64_t c0 = 0; c0 < channels; c0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - c0);
      Floats d[N][N];
      for (int i = 0; i < N; ++i) {
        for (int j = 0; j < N; ++j) {
          d[i][j] = at[i][j] ? load(at[i][j] + c0, width) : Floats{};
        }
      }
      Floats t[N][N];  // B^T d: combinations of rows, column by column
      for (int j = 0; j < N; ++j) {
        input_transform(&d[0][j], N, &t[0][j], N, std::integral_constant<int, M>());
      }
      for (int i = 0; i < N; ++i) {  // (B^T d) B: combinations of columns, row by row
        Floats row[N];
        input_transform(t[i], 1, row, 1, std::integral_constant<int, M>());
        for (int j = 0; j < N; ++j) {
          store(v + (i * N + j) * layout.position + tile * layout.tile + c0, row[j], width);
        }
      }
    }
  }
}

// The M x M outputs of each tile from its N x N products M[p, tile, k]: A^T M A + bias, then the ReLU (a NaN stays
// NaN, as std::max(x, 0) keeps it). M[p, tile, k] is at m + p * layout.position + tile * layout.tile + k.
template <int M>
void output_tiles(const float* m, const float* bias, float* output, const Geometry& g, const Layout& layout,
                  int64_t channels, bool relu, int64_t begin, int64_t end) {
  constexpr int N = M + 2;
  const Floats zero = {};
  for (int64_t tile = begin; tile < end; ++tile) {
    const int64_t image = tile / (g.tiles_h * g.tiles_w);
    const int64_t y0 = (tile / g.tiles_w) % g.tiles_h * M;
    const int64_t x0 = tile % g.tiles_w * M;
    for (int64_t k0 = 0; k0 < channels; k0 += kBlock) {
      const int64_t width = std::min(kBlock, channels - k0);
      Floats s[M][N];  // A^T M: combinations of rows, column by column
      for (int j = 0; j < N; ++j) {
        Floats column[N];
        for (int i = 0; i < N; ++i) {
          column[i] = load(m + (i * N + j) * layout.position + tile * layout.tile + k0, width);
        }
        output_transform(column, 1, &s[0][j], N, std::integral_constant<int, M>());
      }
      const Floats b = load(bias + k0, width);
      for (int i = 0; i < M; ++i) {
        const int64_t y = y0 + i;
        if (y >= g.height) {
          continue;
        }
        Floats out[M];  // (A^T M) A
        output_transform(s[i], 1, out, 1, std::integral_constant<int, M>());
        for (int j = 0; j < M; ++j) {
          const int64_t x = x0 + j;
          if (x >= g.width) {
            continue;
          }
          out[j] = out[j] + b;
          if (relu) {
            out[j] = out[j] < zero ? zero : out[j];
          }
          store(output + ((image * g.height + y) * g.width + x) * channels + k0, out[j], width);
        }
      }
    }
  }
}

// the instantiations, here so that they are compiled for this namespace's instruction set
template void input_tiles<2>(const float*, float*, const Geometry&, const Layout&, int64_t, int64_t, int64_t);
template void input_tiles<4>(const float*, float*, const Geometry&, const Layout&, int64_t, int64_t, int64_t);
template void output_tiles<2>(const float*, const float*, float*, const Geometry&, const Layout&, int64_t, bool,
                              int64_t, int64_t);
template void output_tiles<4>(const float*, const float*, float*, const Geometry&, const Layout&, int64_t, bool,
                              int64_t, int64_t);
