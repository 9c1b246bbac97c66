// server.h — the ZeroMQ ROUTER loop and the frame -> reply dispatcher.
#pragma once

#include <string>

#include "engine.h"

namespace engine {

// Decodes one request frame, runs it on the engine and returns the encoded reply frame.
// Never throws: every failure becomes an error reply (EngineError -> its code, anything
// else -> `internal`).
std::string handle_frame(Engine& eng, const char* data, size_t len);

// Binds a ROUTER socket on `endpoint` and serves requests, one at a time in arrival order,
// until `stop_fd` (the read end of main's signal self-pipe; -1 = none) becomes readable.
// Prints READY to stdout once bound. Removes the ipc socket file on exit. Throws on bind
// failure.
void serve(Engine& eng, const std::string& endpoint, int stop_fd);

}  // namespace engine
