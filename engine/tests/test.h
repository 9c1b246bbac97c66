// test.h — a tiny test harness: TEST(name) registers a function, CHECK records failures.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace test {

struct Case {
  const char* name;
  std::function<void()> fn;
};
std::vector<Case>& registry();
extern int g_failures;  // failures of the current run (test binary only)

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

}  // namespace test

#define TEST(name)                                              \
  static void test_##name();                                    \
  static test::Register test_reg_##name(#name, test_##name);    \
  static void test_##name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "  CHECK failed %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      test::g_failures++;                                                             \
    }                                                                                 \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                              \
  do {                                                                                     \
    const double ca_ = (a), cb_ = (b);                                                     \
    if (!(std::fabs(ca_ - cb_) <= (tol))) {                                                \
      std::fprintf(stderr, "  CHECK_NEAR failed %s:%d: %s=%.9g %s=%.9g tol=%g\n", __FILE__, \
                   __LINE__, #a, ca_, #b, cb_, (double)(tol));                             \
      test::g_failures++;                                                                  \
    }                                                                                      \
  } while (0)
