// 16-byte vector access: the aligned fast path of every elementwise kernel here.
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>

namespace gaea {

template <typename T>
constexpr int vec_width() {
  return 16 / sizeof(T);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* base, int64_t vi) {
  return reinterpret_cast<const Vec<T, N>*>(base)[vi];
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* base, int64_t vi, const Vec<T, N>& x) {
  reinterpret_cast<Vec<T, N>*>(base)[vi] = x;
}

inline bool aligned16(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace gaea
