// common.h — the one error type and CHECK macro used everywhere in the engine.
//
// Why one mechanism: every failure (bad model directory, malformed request, internal bug)
// surfaces as an EngineError carrying a protocol error code. The server turns it into an
// error reply; main() turns a load-time one into "exit 1 with the message". Nothing in the
// engine calls abort() or exit() on bad input.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace engine {

// An error with a machine-readable code (one of PROTOCOL.md's error codes, or "internal"
// for load/config errors and bugs) and a human-readable message.
class EngineError : public std::runtime_error {
 public:
  EngineError(std::string code, const std::string& message)
      : std::runtime_error(message), code_(std::move(code)) {}
  const std::string& code() const { return code_; }

 private:
  std::string code_;
};

}  // namespace engine

// ENGINE_CHECK(cond, code, msg-stream): throw EngineError(code, msg) unless cond holds.
// `msg` is a stream expression, e.g. ENGINE_CHECK(n > 0, "internal", "n=" << n).
#define ENGINE_CHECK(cond, code, msg)                  \
  do {                                                 \
    if (!(cond)) {                                     \
      std::ostringstream engine_check_os_;             \
      engine_check_os_ << msg;                         \
      throw ::engine::EngineError((code), engine_check_os_.str()); \
    }                                                  \
  } while (0)

// ENGINE_FAIL(code, msg-stream): unconditional throw, same message formatting.
#define ENGINE_FAIL(code, msg) ENGINE_CHECK(false, code, msg)
