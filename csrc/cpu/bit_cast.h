// bit_cast for C++17 builds: torch before 2.13 compiles extensions as C++17, where std::bit_cast
// (C++20) does not exist.  GCC, clang and MSVC all provide the builtin std::bit_cast wraps.
#pragma once

namespace childopt {
namespace cpu {

template <typename To, typename From>
[[gnu::always_inline]] inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  return __builtin_bit_cast(To, from);
}

}  // namespace cpu
}  // namespace childopt
