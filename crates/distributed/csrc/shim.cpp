// facerec-distributed: a thin `extern "C"` bridge from Rust to libtorch's c10d.
//
// Every function catches every C++ exception (c10::Error and its c10d subclasses, gloo's
// exceptions, std::exception, anything else) and hands its text back as a malloc'd C string that
// the caller frees with fdist_free_string. NULL means success. Nothing here aborts the process.
//
// Tensors arrive as `at::Tensor*`: that is what tch's `Tensor::as_ptr()` returns (torch-sys's
// `typedef torch::Tensor *tensor;` in libtch/torch_api.h, and torch::Tensor is at::Tensor).
//
// The process group is used through the c10d::Backend interface directly (ProcessGroupGloo or
// ProcessGroupNCCL), not through c10d::ProcessGroup and the dispatcher: no op registration is
// needed and a call is one virtual call plus Work::wait.

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef FACEREC_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  bool native_avg;  // NCCL reduces AVG itself; Gloo gets SUM then a division.
  int size;
};

char* dup_string(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, text.data(), text.size());
    out[text.size()] = '\0';
  }
  return out;
}

// Runs `body`, turning any exception into an error string (NULL on success).
template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return dup_string(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup_string(e.what());
  } catch (...) {
    return dup_string("unknown C++ exception");
  }
}

// Reduce operations, numbered as the Rust side's `ReduceOp`.
c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 0:
      return c10d::ReduceOp(c10d::ReduceOp::SUM);
    case 1:
      return c10d::ReduceOp(c10d::ReduceOp::AVG);
    case 2:
      return c10d::ReduceOp(c10d::ReduceOp::MAX);
    case 3:
      return c10d::ReduceOp(c10d::ReduceOp::MIN);
    case 4:
      return c10d::ReduceOp(c10d::ReduceOp::PRODUCT);
    default:
      throw std::invalid_argument("unknown reduce op code " + std::to_string(op));
  }
}

void wait_work(Group* g, const c10::intrusive_ptr<c10d::Work>& work) {
  if (!work->wait(g->timeout)) {
    throw std::runtime_error(
        "collective did not complete within " + std::to_string(g->timeout.count()) + " ms");
  }
}

// Gloo has no AVG: reduce with SUM, then divide (floating tensors only).
bool split_avg(Group* g, int op) {
  return op == 1 && !g->native_avg;
}

void divide_by_size(Group* g, at::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type())) {
    throw std::invalid_argument("ReduceOp::Avg needs a floating-point tensor");
  }
  t.div_(static_cast<double>(g->size));
}

c10::intrusive_ptr<c10d::Store> make_store(
    const char* host, uint16_t port, int rank, int size, std::chrono::milliseconds timeout) {
  if (size == 1) {
    return c10::make_intrusive<c10d::HashStore>();
  }
  c10d::TCPStoreOptions opts;
  opts.port = port;
  opts.isServer = rank == 0;
  opts.numWorkers = static_cast<std::size_t>(size);
  opts.waitWorkers = true;
  opts.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

}  // namespace

extern "C" {

typedef struct Group fdist_group;

void fdist_free_string(char* s) {
  std::free(s);
}

// Rendezvous through a TCPStore at host:port (rank 0 hosts it; a world of one uses an in-memory
// store) and create a Gloo process group. `device_host` names the address this rank binds its
// Gloo transport to; NULL or "" means: loopback when `host` is loopback, else libtorch's default
// (GLOO_SOCKET_IFNAME if set, else this machine's hostname).
char* fdist_new_gloo(
    const char* host,
    uint16_t port,
    int rank,
    int size,
    int64_t timeout_ms,
    const char* device_host,
    int threads,
    fdist_group** out) {
  *out = nullptr;
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = make_store(host, port, rank, size, timeout);
    c10::intrusive_ptr<c10d::ProcessGroupGloo::Options> opts;
    std::string bind = device_host != nullptr ? device_host : "";
    if (bind.empty() && (size == 1 || is_loopback(host))) {
      bind = "127.0.0.1";
    }
    if (bind.empty()) {
      opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
    } else {
      opts = c10d::ProcessGroupGloo::Options::create(timeout);
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(bind));
    }
    if (threads > 0) {
      opts->threads = threads;
    }
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
    *out = new Group{store, backend, timeout, false, size};
  });
}

// The same with ProcessGroupNCCL (tensors on cuda:`device`). Without the `nccl` feature this
// returns an error.
char* fdist_new_nccl(
    const char* host,
    uint16_t port,
    int rank,
    int size,
    int64_t timeout_ms,
    int device,
    fdist_group** out) {
  *out = nullptr;
#ifdef FACEREC_NCCL
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = make_store(host, port, rank, size, timeout);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts);
    // Bind the communicator to this rank's GPU now, so that a wrong device fails here.
    backend->eagerConnectSingleDevice(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    *out = new Group{store, backend, timeout, true, size};
  });
#else
  (void)host;
  (void)port;
  (void)rank;
  (void)size;
  (void)timeout_ms;
  (void)device;
  return dup_string("facerec-distributed was built without the `nccl` feature");
#endif
}

void fdist_free(fdist_group* g) {
  try {
    delete g;
  } catch (...) {
  }
}

char* fdist_all_reduce(fdist_group* g, at::Tensor* t, int op) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> tensors{*t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = split_avg(g, op) ? c10d::ReduceOp(c10d::ReduceOp::SUM) : reduce_op(op);
    opts.timeout = g->timeout;
    wait_work(g, g->backend->allreduce(tensors, opts));
    if (split_avg(g, op)) {
      divide_by_size(g, *t);
    }
  });
}

char* fdist_broadcast(fdist_group* g, at::Tensor* t, int root) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> tensors{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    wait_work(g, g->backend->broadcast(tensors, opts));
  });
}

// `output` holds size * input.numel() elements, rank r's input at block r.
char* fdist_all_gather_base(fdist_group* g, at::Tensor* output, at::Tensor* input) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    c10d::AllgatherOptions opts;
    opts.timeout = g->timeout;
    wait_work(g, g->backend->_allgather_base(*output, *input, opts));
  });
}

// `outputs` is an array of `size` tensors shaped like `input`.
char* fdist_all_gather(fdist_group* g, at::Tensor** outputs, int n, at::Tensor* input) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    std::vector<std::vector<at::Tensor>> outs(1);
    for (int i = 0; i < n; ++i) {
      outs[0].push_back(*outputs[i]);
    }
    std::vector<at::Tensor> ins{*input};
    c10d::AllgatherOptions opts;
    opts.timeout = g->timeout;
    wait_work(g, g->backend->allgather(outs, ins, opts));
  });
}

// `input` holds size blocks shaped like `output`; rank r receives the reduction of block r.
char* fdist_reduce_scatter_base(fdist_group* g, at::Tensor* output, at::Tensor* input, int op) {
  return guarded([&] {
    at::NoGradGuard no_grad;
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = split_avg(g, op) ? c10d::ReduceOp(c10d::ReduceOp::SUM) : reduce_op(op);
    opts.timeout = g->timeout;
    wait_work(g, g->backend->_reduce_scatter_base(*output, *input, opts));
    if (split_avg(g, op)) {
      divide_by_size(g, *output);
    }
  });
}

char* fdist_barrier(fdist_group* g) {
  return guarded([&] {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    wait_work(g, g->backend->barrier(opts));
  });
}

// Key-value access to the rendezvous store (bounded by the group's timeout).
char* fdist_store_set(fdist_group* g, const char* key, const uint8_t* value, size_t len) {
  return guarded([&] {
    std::vector<uint8_t> bytes(value, value + len);
    g->store->set(std::string(key), bytes);
  });
}

char* fdist_store_get(fdist_group* g, const char* key, uint8_t** value, size_t* len) {
  *value = nullptr;
  *len = 0;
  return guarded([&] {
    g->store->setTimeout(g->timeout);
    std::vector<uint8_t> bytes = g->store->get(std::string(key));
    uint8_t* buf = static_cast<uint8_t*>(std::malloc(bytes.size() + 1));
    if (buf == nullptr) {
      throw std::bad_alloc();
    }
    std::memcpy(buf, bytes.data(), bytes.size());
    *value = buf;
    *len = bytes.size();
  });
}

}  // extern "C"
