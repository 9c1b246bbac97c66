// test_main.cpp — runs every registered TEST; optional argv[1] filters by substring.
#include <cstring>
#include <exception>

#include "test.h"

namespace test {
std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}
int g_failures = 0;
}  // namespace test

int main(int argc, char** argv) {
  int failed_cases = 0, run = 0;
  for (const auto& c : test::registry()) {
    if (argc > 1 && !std::strstr(c.name, argv[1])) continue;
    const int before = test::g_failures;
    try {
      c.fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  exception: %s\n", e.what());
      test::g_failures++;
    }
    run++;
    const bool ok = test::g_failures == before;
    failed_cases += !ok;
    std::printf("%s %s\n", ok ? "PASS" : "FAIL", c.name);
  }
  std::printf("%d/%d tests passed\n", run - failed_cases, run);
  return failed_cases == 0 ? 0 : 1;
}
