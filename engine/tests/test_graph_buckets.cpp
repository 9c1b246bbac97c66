// test_graph_buckets.cpp — the CUDA backend's decode graph sizes (host-only logic).
#include "cuda/graph_buckets.h"
#include "test.h"

using engine::cuda::decode_graph_bucket;

TEST(graph_buckets_pad_to_the_next_capture_size) {
  CHECK(decode_graph_bucket(1, 8192) == 1);
  CHECK(decode_graph_bucket(2, 8192) == 2);
  CHECK(decode_graph_bucket(3, 8192) == 4);
  CHECK(decode_graph_bucket(5, 8192) == 8);
  CHECK(decode_graph_bucket(9, 8192) == 16);
  CHECK(decode_graph_bucket(33, 8192) == 40);
  // A step of 129 runs as 136 (powers of two would have made it 256).
  CHECK(decode_graph_bucket(129, 8192) == 136);
  CHECK(decode_graph_bucket(256, 8192) == 256);
  // Every bucket holds the step and wastes fewer than 8 rows past 4.
  for (int n = 1; n <= 256; n++) {
    const int b = decode_graph_bucket(n, 8192);
    CHECK(b >= n && b - n < (n <= 4 ? n : 8));
  }
}

TEST(graph_buckets_none_past_the_limits) {
  CHECK(decode_graph_bucket(0, 8192) == 0);
  CHECK(decode_graph_bucket(257, 8192) == 0);
  // The padded batch must fit the engine's token budget.
  CHECK(decode_graph_bucket(5, 6) == 0);
  CHECK(decode_graph_bucket(4, 6) == 4);
}
