// A tiny test harness for the C++ unit tests (no framework to download).
//
//   TEST(name) { CHECK(cond); CHECK_EQ(a, b); CHECK_CONTAINS(text, part); }
//
// Each test binary runs every TEST in it (or those whose name contains
// argv[1]) and exits non-zero if a check failed. A failed check reports
// file:line and goes on, so one run shows every failure.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace pyccl_test {

struct Case {
  const char* name;
  void (*fn)();
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}
inline int& failures() {
  static int n = 0;
  return n;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { cases().push_back({name, fn}); }
};

inline void report(const char* file, int line, const std::string& what) {
  ++failures();
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

template <typename T>
void show(std::ostream& os, const T& v) {
  if constexpr (std::is_enum_v<T>) os << static_cast<long long>(v);
  else if constexpr (std::is_same_v<T, uint8_t>) os << static_cast<int>(v);
  else os << v;
}

template <typename A, typename B>
void check_eq(const A& a, const B& b, const char* sa, const char* sb, const char* file, int line) {
  if (a == b) return;
  std::ostringstream os;
  os << sa << " == " << sb << " (";
  show(os, a);
  os << " vs ";
  show(os, b);
  os << ")";
  report(file, line, os.str());
}

inline int run_all(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int ran = 0;
  for (const Case& c : cases()) {
    if (!filter.empty() && std::string(c.name).find(filter) == std::string::npos) continue;
    const int before = failures();
    c.fn();
    ++ran;
    std::printf("%s %s\n", failures() == before ? "ok  " : "FAIL", c.name);
  }
  std::printf("%d tests, %d failed checks\n", ran, failures());
  return failures() == 0 && ran > 0 ? 0 : 1;
}

}  // namespace pyccl_test

#define TEST(name)                                                              \
  static void name();                                                           \
  static const ::pyccl_test::Registrar name##_registrar(#name, &name);          \
  static void name()

#define CHECK(cond) \
  do {              \
    if (!(cond)) ::pyccl_test::report(__FILE__, __LINE__, #cond); \
  } while (0)

#define CHECK_EQ(a, b) ::pyccl_test::check_eq((a), (b), #a, #b, __FILE__, __LINE__)

#define CHECK_CONTAINS(text, part)                                                                     \
  do {                                                                                                 \
    const std::string text_ = (text);                                                                  \
    if (text_.find(part) == std::string::npos)                                                         \
      ::pyccl_test::report(__FILE__, __LINE__, std::string(#text " contains \"") + (part) + "\": " + text_); \
  } while (0)

#define TEST_MAIN() \
  int main(int argc, char** argv) { return ::pyccl_test::run_all(argc, argv); }
