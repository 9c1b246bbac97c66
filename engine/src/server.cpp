// server.cpp — see server.h.
#include "server.h"

#include <unistd.h>
#include <zmq.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "common.h"

namespace engine {

std::string handle_frame(Engine& eng, const char* data, size_t len) {
  uint64_t req_id = 0;
  try {
    const Request req = decode_request(data, len, &req_id);
    if (req.type == "info") return encode_info(req_id, eng.info());
    if (req.type == "health") return encode_health(req_id, eng.health());
    if (req.type == "step") return encode_step(req_id, eng.step(req), req.packed_outputs);
    if (req.type == "release") return encode_release(req_id, eng.release(req.seq_ids));
    if (req.type == "embed") return encode_embed(req_id, eng.embed(req.tokens));
    return encode_error(req_id, "unknown_type", "unknown request type");  // decode rejects these
  } catch (const EngineError& e) {
    return encode_error(req_id, e.code(), e.what());
  } catch (const std::exception& e) {
    return encode_error(req_id, "internal", e.what());
  } catch (...) {
    return encode_error(req_id, "internal", "unknown exception");
  }
}

namespace {

// RAII for the zmq context and socket, so every exit path closes them (which lets libzmq
// remove the ipc file it created).
struct Zmq {
  void* ctx = nullptr;
  void* sock = nullptr;
  ~Zmq() {
    if (sock) zmq_close(sock);
    if (ctx) zmq_ctx_term(ctx);
  }
};

// Receives all frames of one multipart message. Returns false on EINTR/EAGAIN.
bool recv_multipart(void* sock, std::vector<std::string>& frames) {
  frames.clear();
  for (;;) {
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
      const int err = zmq_errno();
      zmq_msg_close(&m);
      // Parts of a multipart message arrive atomically, so only EINTR can split one.
      if (frames.empty() || err != EINTR) return false;
      continue;
    }
    frames.emplace_back((const char*)zmq_msg_data(&m), zmq_msg_size(&m));
    const bool more = zmq_msg_more(&m);
    zmq_msg_close(&m);
    if (!more) return true;
  }
}

void send_multipart(void* sock, const std::vector<std::string>& envelope, const std::string& body) {
  for (const std::string& f : envelope) zmq_send(sock, f.data(), f.size(), ZMQ_SNDMORE);
  zmq_send(sock, body.data(), body.size(), 0);
}

}  // namespace

void serve(Engine& eng, const std::string& endpoint, int stop_fd) {
  Zmq z;
  z.ctx = zmq_ctx_new();
  ENGINE_CHECK(z.ctx, "internal", "zmq_ctx_new failed");
  z.sock = zmq_socket(z.ctx, ZMQ_ROUTER);
  ENGINE_CHECK(z.sock, "internal", "zmq_socket failed");
  int linger = 0;
  zmq_setsockopt(z.sock, ZMQ_LINGER, &linger, sizeof linger);
  ENGINE_CHECK(zmq_bind(z.sock, endpoint.c_str()) == 0, "internal",
               "cannot bind " << endpoint << ": " << zmq_strerror(zmq_errno()));

  std::printf("READY\n");
  std::fflush(stdout);

  std::vector<std::string> frames;
  for (;;) {
    zmq_pollitem_t items[2] = {{z.sock, 0, ZMQ_POLLIN, 0}, {nullptr, stop_fd, ZMQ_POLLIN, 0}};
    const int n = zmq_poll(items, stop_fd >= 0 ? 2 : 1, -1);
    if (n < 0) {
      if (zmq_errno() == EINTR) continue;
      ENGINE_FAIL("internal", "zmq_poll: " << zmq_strerror(zmq_errno()));
    }
    if (stop_fd >= 0 && (items[1].revents & ZMQ_POLLIN)) {
      unsigned char signo = 0;
      if (read(stop_fd, &signo, 1) == 1)
        std::fprintf(stderr, "llm-engine: signal %u, shutting down\n", (unsigned)signo);
      break;
    }
    // Drain every message that is ready before polling again.
    while (recv_multipart(z.sock, frames)) {
      // ROUTER frames: [identity, payload] from a DEALER, or [identity, "", payload] from a
      // REQ-style peer; echo everything before the payload as the reply envelope.
      if (frames.size() < 2) continue;
      const std::string payload = std::move(frames.back());
      frames.pop_back();
      send_multipart(z.sock, frames, handle_frame(eng, payload.data(), payload.size()));
    }
  }

  if (endpoint.rfind("ipc://", 0) == 0) {
    zmq_close(z.sock);
    z.sock = nullptr;
    unlink(endpoint.c_str() + 6);  // libzmq usually does this; make sure
  }
}

}  // namespace engine
