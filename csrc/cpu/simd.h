// Portable 32-byte vectors (GCC/Clang vector extensions) and an AVX2+FMA build of a kernel
// body chosen at run time: wheels are compiled for baseline x86-64 (SSE2), but the mixed op is
// instruction-bound once its inputs sit in cache, so the wider ISA pays where it exists.
#pragma once
#include <cstdint>
#include <cstring>

namespace gaea {

template <typename T>
struct Vec32 {
  typedef T type __attribute__((vector_size(32), aligned(sizeof(T))));  // unaligned access ok
  static constexpr int lanes = 32 / sizeof(T);
};

template <typename T>
using vec_t = typename Vec32<T>::type;

template <typename T>
inline __attribute__((always_inline)) vec_t<T> vload(const T* p) {
  return *reinterpret_cast<const vec_t<T>*>(p);
}

template <typename T>
inline __attribute__((always_inline)) void vstore(T* p, vec_t<T> v) {
  *reinterpret_cast<vec_t<T>*>(p) = v;
}

template <typename T>
inline __attribute__((always_inline)) vec_t<T> vsplat(T x) {
  return vec_t<T>{} + x;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GAEA_HAVE_AVX2_DISPATCH 1
#define GAEA_TARGET_AVX2 __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
#define GAEA_HAVE_AVX2_DISPATCH 0
#define GAEA_TARGET_AVX2
inline bool cpu_has_avx2() { return false; }
#endif

}  // namespace gaea
