// sampler.cpp — see sampler.h.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace engine {

uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double sampling_uniform(uint64_t seed, uint64_t pos) {
  const uint64_t r = splitmix64(seed ^ (0x9E3779B97F4A7C15ull * (pos + 1)));
  return (double)(r >> 11) * 0x1.0p-53;
}

// Top-p over the whole vocabulary in O(V) without sorting it: bucket ids by the top bits of
// (float)e_i, which orders buckets exactly like the probabilities; sum the mass of buckets
// from the most probable down to find the bucket holding the cut, and sort only that
// bucket's ids (by tempered logit desc, id asc) to place the cut exactly.
void Sampler::top_p_full_vocab(int64_t V, double target) {
  // Finer buckets for big vocabularies (fewer ids to sort in the cut bucket), coarser for
  // small ones (less histogram to clear). Every e_i <= 1 (the max has z = 0), so keys stop
  // at key(1.0f): 16257 buckets (128 KB) at shift 16, 2033 at shift 19.
  const int shift = V >= (1 << 16) ? 16 : 19;
  const uint32_t one_bits = 0x3F800000u;  // 1.0f
  auto key = [shift, one_bits](double e) {
    const float f = (float)e;
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return std::min(bits, one_bits) >> shift;  // clamp: NaN logits must not index out of range
  };
  bucket_mass_.assign((size_t)(one_bits >> shift) + 1, 0.0);
  for (int64_t i = 0; i < V; i++) bucket_mass_[key(e_[i])] += e_[i];
  double acc = 0.0;
  int64_t cut_bucket = -1;
  for (int64_t b = (int64_t)bucket_mass_.size() - 1; b >= 0; b--) {
    if (acc + bucket_mass_[b] >= target) { cut_bucket = b; break; }
    acc += bucket_mass_[b];
  }
  if (cut_bucket < 0) return;  // rounding: mass never reached top_p -> keep all
  idx_.clear();
  for (int64_t i = 0; i < V; i++) {
    const int64_t k = key(e_[i]);
    if (k < cut_bucket) keep_[i] = 0;
    else if (k == cut_bucket) idx_.push_back((int32_t)i);
  }
  const double* z = z_.data();
  std::sort(idx_.begin(), idx_.end(), [z](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); });
  size_t j = 0;
  while (j < idx_.size() && (acc += e_[idx_[j]]) < target) j++;
  for (j++; j < idx_.size(); j++) keep_[idx_[j]] = 0;  // ids ranked after the cut
}

SampleResult Sampler::sample(const float* logits, int64_t V, const SamplingParams& p, uint64_t pos,
                            bool want_logprob) {
  if (p.temperature == 0.0) {
    int64_t best = 0;
    for (int64_t i = 1; i < V; i++)
      if (logits[i] > logits[best]) best = i;  // strict: ties keep the lowest id
    if (!want_logprob) return {(int32_t)best, 0.0};
    double mx = logits[best], s = 0.0;
    for (int64_t i = 0; i < V; i++) s += std::exp((double)logits[i] - mx);
    return {(int32_t)best, -std::log(s)};
  }

  // z_i = (logit_i - max) / T: the max is subtracted *before* dividing so that a tiny
  // temperature cannot overflow to inf (and inf - inf = NaN); max z is then exactly 0.
  // A broken model may emit NaN/inf: NaN counts as -inf, and +inf logits share all the
  // mass, so every z is in [-inf, 0] and the orderings below stay strict weak orders.
  double lmax = -INFINITY;
  for (int64_t i = 0; i < V; i++)
    if (!std::isnan(logits[i])) lmax = std::max(lmax, (double)logits[i]);
  z_.resize(V);
  for (int64_t i = 0; i < V; i++) {
    const double l = std::isnan(logits[i]) ? -INFINITY : (double)logits[i];
    if (std::isinf(lmax)) z_[i] = (l == lmax) ? 0.0 : -INFINITY;  // all -inf: uniform
    else z_[i] = (l - lmax) / p.temperature;
  }
  // e_i = exp(z_i), computed once; log_z is the full-vocabulary log-partition.
  e_.resize(V);
  double all_mass = 0.0;
  for (int64_t i = 0; i < V; i++) all_mass += (e_[i] = std::exp(z_[i]));
  const double log_z = std::log(all_mass);

  const double* z = z_.data();
  auto by_score = [z](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };

  // 1. top-k: the candidates are idx_[0, n) (unordered); without top-k, all ids.
  const bool all = !(p.top_k > 0 && p.top_k < V);
  const int64_t n = all ? V : p.top_k;
  double sum = all_mass;  // mass of the candidates (unnormalised)
  if (all) {
    keep_.assign(V, 1);
  } else {
    idx_.resize(V);
    for (int64_t i = 0; i < V; i++) idx_[i] = (int32_t)i;
    std::nth_element(idx_.begin(), idx_.begin() + (n - 1), idx_.end(), by_score);
    keep_.assign(V, 0);
    sum = 0.0;
    for (int64_t j = 0; j < n; j++) { keep_[idx_[j]] = 1; sum += e_[idx_[j]]; }
  }

  // 2. top-p: keep the smallest prefix, most probable first (ties -> lower id), whose
  //    mass reaches top_p of the candidates' mass.
  if (p.top_p < 1.0) {
    const double target = p.top_p * sum;
    if (!all) {
      std::sort(idx_.begin(), idx_.begin() + n, by_score);
      double acc = 0.0;
      int64_t kept = n;  // rounding never reaching top_p keeps everything
      for (int64_t j = 0; j < n; j++)
        if ((acc += e_[idx_[j]]) >= target) { kept = j + 1; break; }
      for (int64_t j = kept; j < n; j++) keep_[idx_[j]] = 0;
    } else {
      top_p_full_vocab(V, target);
    }
  }

  // Inverse CDF over the kept ids in ascending id order.
  double total = 0.0;
  for (int64_t i = 0; i < V; i++)
    if (keep_[i]) total += e_[i];
  const double target = sampling_uniform(p.seed, pos) * total;
  double cum = 0.0;
  int64_t chosen = -1;
  for (int64_t i = 0; i < V; i++) {
    if (!keep_[i]) continue;
    chosen = i;  // last kept id is the fallback when rounding leaves cum <= target
    cum += e_[i];
    if (cum > target) break;
  }
  return {(int32_t)chosen, z_[chosen] - log_z};
}

}  // namespace engine
