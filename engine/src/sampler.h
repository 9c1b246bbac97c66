// sampler.h — next-token sampling exactly as PROTOCOL.md "Sampling" specifies.
//
// temperature == 0: argmax, ties -> lowest id.
// Otherwise, with z = logits / temperature:
//   1. top_k > 0: keep the top_k largest z (ties at the cut -> lower ids kept);
//   2. softmax over the kept tokens (f64);
//   3. top_p < 1: keep the smallest set of most probable tokens (ordered by probability
//      descending, ties -> lower id first) whose mass reaches top_p (cumulative >= top_p);
//   4. renormalise and draw by inverse CDF with u = uniform(seed, pos). The CDF runs over
//      the kept tokens in ascending token-id order: the first kept id whose cumulative
//      mass exceeds u * total is chosen.
// logprob: log-softmax of the tempered logits over the FULL vocabulary (before top-k/top-p
// truncation) at the chosen token; for temperature == 0, of the raw logits (temperature 1).
#pragma once

#include <cstdint>
#include <vector>

namespace engine {

struct SamplingParams {
  double temperature = 1.0;  // 0 = greedy
  double top_p = 1.0;        // in (0, 1]
  int64_t top_k = 0;         // 0 = off
  uint64_t seed = 0;
};

// splitmix64 finaliser of (x + 0x9E3779B97F4A7C15) (Vigna's reference `next()` on state x).
uint64_t splitmix64(uint64_t x);

// u in [0, 1): (splitmix64(seed ^ (0x9E3779B97F4A7C15 * (pos + 1))) >> 11) * 2^-53, where
// pos is the position of the token being produced.
double sampling_uniform(uint64_t seed, uint64_t pos);

struct SampleResult {
  int32_t token;
  double logprob;
};

// Reusable sampler: keeps scratch buffers sized to the vocabulary between calls.
class Sampler {
 public:
  // logits: [vocab] f32. pos: position of the produced token (start_pos + len(tokens)).
  // want_logprob = false lets greedy decoding skip the log-partition (logprob is then 0).
  SampleResult sample(const float* logits, int64_t vocab, const SamplingParams& p, uint64_t pos,
                      bool want_logprob = true);

 private:
  std::vector<double> z_;      // tempered logits
  std::vector<double> e_;      // exp(z - max z): unnormalised probabilities
  std::vector<int32_t> idx_;   // candidate ids
  std::vector<char> keep_;     // kept-token mask
  std::vector<double> bucket_mass_;  // top-p histogram (see top_p_full_vocab)
  void top_p_full_vocab(int64_t vocab, double target);
};

}  // namespace engine
