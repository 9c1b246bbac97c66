// test_sampler.cpp — sampling rules of PROTOCOL.md.
#include <cmath>
#include <vector>

#include "sampler.h"
#include "test.h"

using engine::Sampler;
using engine::SamplingParams;

static SamplingParams params(double t, double top_p, int64_t top_k, uint64_t seed) {
  SamplingParams p;
  p.temperature = t;
  p.top_p = top_p;
  p.top_k = top_k;
  p.seed = seed;
  return p;
}

TEST(splitmix64_reference_value) {
  // First output of Vigna's splitmix64 generator seeded with 0.
  CHECK(engine::splitmix64(0) == 0xE220A8397B1DCDAFull);
  const double u = engine::sampling_uniform(42, 7);
  CHECK(u >= 0.0 && u < 1.0);
}

TEST(greedy_tie_lowest_id) {
  Sampler s;
  const float logits[] = {1.0f, 3.0f, 3.0f, 2.0f};
  auto r = s.sample(logits, 4, params(0, 1, 0, 0), 5);
  CHECK(r.token == 1);
  // logprob is the raw log-softmax at the argmax.
  const double z = std::exp(1.0) + 2 * std::exp(3.0) + std::exp(2.0);
  CHECK_NEAR(r.logprob, 3.0 - std::log(z), 1e-9);
}

TEST(top_k1_equals_greedy) {
  Sampler s;
  std::vector<float> logits(1000);
  uint64_t x = 1;
  for (auto& v : logits) { x = engine::splitmix64(x); v = (float)((x >> 40) % 1000) / 100.0f; }
  const int greedy = s.sample(logits.data(), 1000, params(0, 1, 0, 0), 1).token;
  for (uint64_t seed = 0; seed < 20; seed++)
    CHECK(s.sample(logits.data(), 1000, params(1.3, 1, 1, seed), seed).token == greedy);
}

TEST(same_seed_same_token) {
  Sampler s;
  std::vector<float> logits(500, 0.0f);  // uniform: the draw decides everything
  for (uint64_t pos = 0; pos < 20; pos++) {
    const int a = s.sample(logits.data(), 500, params(1, 1, 0, 1234), pos).token;
    const int b = s.sample(logits.data(), 500, params(1, 1, 0, 1234), pos).token;
    CHECK(a == b);
  }
  // Different positions give different draws (not all equal).
  int distinct = 0, prev = -1;
  for (uint64_t pos = 0; pos < 20; pos++) {
    const int t = s.sample(logits.data(), 500, params(1, 1, 0, 1234), pos).token;
    distinct += t != prev;
    prev = t;
  }
  CHECK(distinct > 10);
}

TEST(tiny_top_p_is_argmax) {
  Sampler s;
  const float logits[] = {0.5f, 2.0f, 1.9f, -1.0f, 2.0f};
  for (uint64_t seed = 0; seed < 50; seed++)
    CHECK(s.sample(logits, 5, params(1, 1e-9, 0, seed), seed).token == 1);
}

TEST(top_k_cut_keeps_lower_ids_on_ties) {
  Sampler s;
  const float logits[] = {1.0f, 1.0f, 1.0f};
  for (uint64_t seed = 0; seed < 200; seed++) CHECK(s.sample(logits, 3, params(1, 1, 2, seed), 0).token != 2);
}

TEST(distribution_sanity) {
  Sampler s;
  const double probs[] = {0.5, 0.3, 0.2};
  const float logits[] = {(float)std::log(0.5), (float)std::log(0.3), (float)std::log(0.2)};
  const int N = 20000;
  int count[3] = {0, 0, 0};
  for (int i = 0; i < N; i++) count[s.sample(logits, 3, params(1, 1, 0, (uint64_t)i * 7919), 3).token]++;
  for (int k = 0; k < 3; k++) CHECK_NEAR((double)count[k] / N, probs[k], 0.02);
  // top_p = 0.7 keeps {0, 1} (0.5 + 0.3 >= 0.7): renormalised 0.625 / 0.375.
  int c2[3] = {0, 0, 0};
  for (int i = 0; i < N; i++) c2[s.sample(logits, 3, params(1, 0.7, 0, (uint64_t)i), 3).token]++;
  CHECK(c2[2] == 0);
  CHECK_NEAR((double)c2[0] / N, 0.625, 0.02);
  // Temperature 2 flattens: p ~ sqrt(p).
  int c3[3] = {0, 0, 0};
  for (int i = 0; i < N; i++) c3[s.sample(logits, 3, params(2, 1, 0, (uint64_t)i), 9).token]++;
  const double zs = std::sqrt(0.5) + std::sqrt(0.3) + std::sqrt(0.2);
  CHECK_NEAR((double)c3[0] / N, std::sqrt(0.5) / zs, 0.02);
}

TEST(logprob_is_tempered_full_vocab) {
  Sampler s;
  const float logits[] = {0.0f, 1.0f, 2.0f};
  auto r = s.sample(logits, 3, params(0.5, 0.5, 1, 3), 0);  // top_k=1 -> token 2
  CHECK(r.token == 2);
  const double z = std::exp(0.0) + std::exp(2.0) + std::exp(4.0);
  CHECK_NEAR(r.logprob, 4.0 - std::log(z), 1e-9);
}

TEST(tiny_temperature_behaves_like_greedy) {
  Sampler s;
  const float logits[] = {0.5f, 2.0f, 1.9f, -1.0f};
  for (uint64_t seed = 0; seed < 20; seed++) {
    auto r = s.sample(logits, 4, params(1e-300, 1, 0, seed), seed);
    CHECK(r.token == 1 && std::isfinite(r.logprob));
  }
}

// Reference nucleus set by full sort, compared with the sampler: no id outside the set is
// ever drawn, and every id of the set with a renormalised probability above 1/400 is drawn.
// V = 40 (top-k-free small path) and V = 3000 (a peaked distribution over a large vocab).
TEST(top_p_set_matches_full_sort) {
  Sampler s;
  uint64_t x = 7;
  for (int trial = 0; trial < 30; trial++) {
    const int V = trial % 2 ? 40 : 3000;
    std::vector<float> logits(V, 0.0f);
    for (int i = 0; i < (V == 40 ? 40 : 30); i++) {  // many ties on purpose
      x = engine::splitmix64(x);
      logits[V == 40 ? i : (int)((x >> 20) % V)] = (float)((x >> 40) % 7) * 0.5f + (V == 40 ? 0.0f : 5.0f);
    }
    const double top_p = 0.1 + 0.03 * trial;
    std::vector<int> order(V);
    for (int i = 0; i < V; i++) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    double mx = logits[order[0]], z = 0;
    for (float l : logits) z += std::exp((double)l - mx);
    std::vector<char> kept(V, 0);
    double cum = 0;
    for (int j = 0; j < V; j++) {
      kept[order[j]] = 1;
      cum += std::exp((double)logits[order[j]] - mx) / z;
      if (cum >= top_p) break;
    }
    std::vector<char> seen(V, 0);
    for (uint64_t seed = 0; seed < 4000; seed++) seen[s.sample(logits.data(), V, params(1, top_p, 0, seed), 0).token] = 1;
    for (int i = 0; i < V; i++) {
      const double p_renorm = std::exp((double)logits[i] - mx) / z / cum;
      CHECK(!seen[i] || kept[i]);
      if (kept[i] && p_renorm > 1.0 / 400) CHECK(seen[i]);
    }
  }
}

TEST(nan_logits_do_not_crash) {
  Sampler s;
  std::vector<float> logits(70000, 0.0f);
  logits[5] = NAN;
  logits[9] = INFINITY;
  for (double top_p : {1.0, 0.5}) {
    auto r = s.sample(logits.data(), 70000, params(0.7, top_p, 0, 1), 3);
    CHECK(r.token >= 0 && r.token < 70000);
    r = s.sample(logits.data(), 70000, params(0.7, top_p, 10, 1), 3);
    CHECK(r.token >= 0 && r.token < 70000);
  }
}
