// sequence.h — what the engine remembers per live sequence between steps, so that a step
// only carries diffs (new tokens, new blocks).
#pragma once

#include <cstdint>
#include <vector>

#include "sampler.h"

namespace engine {

struct SequenceState {
  uint64_t seq_id = 0;
  std::vector<int32_t> block_table;  // block ids; position p lives in block_table[p / 16]
  SamplingParams sampling;
  int64_t num_computed_tokens = 0;   // positions 0 .. n-1 are in the KV cache
};

}  // namespace engine
