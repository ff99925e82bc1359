// pyccl._core: the pybind11 face of the C++ data plane.
//
// Deliberately thin: buffers cross as raw addresses (Python keeps the
// arrays alive for the duration of the call) and every call that can block
// releases the GIL, so the peer's control thread keeps heart-beating while
// bytes move.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string_view>
#include <tuple>
#include <vector>

#include <cstdint>
#include <cstring>

#include "common/hmac.h"
#include "common/log.h"
#include "common/status.h"
#include "dataplane.h"
#include "kernels/dtype.h"
#include "kernels/hash.h"
#include "kernels/quantize.h"
#include "kernels/reduce.h"
#include "state/state_fetch.h"

namespace py = pybind11;
using namespace pyccl;

namespace {

DType to_dtype(int code) {
  if (!valid_dtype(static_cast<uint8_t>(code))) throw py::value_error("unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

RedOp to_redop(int code) {
  if (!valid_redop(static_cast<uint8_t>(code))) throw py::value_error("unknown reduce op code " + std::to_string(code));
  return static_cast<RedOp>(code);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyccl data plane (C++): ring collectives over pooled TCP connections";

  py::enum_<FailKind>(m, "FailKind")
      .value("NONE", FailKind::None)
      .value("PEER", FailKind::Peer)
      .value("MISMATCH", FailKind::Mismatch)
      .value("PROTOCOL", FailKind::Protocol)
      .value("ABORTED", FailKind::Aborted)
      .value("INVALID", FailKind::Invalid);

  py::enum_<Collective>(m, "Collective")
      .value("ALL_REDUCE", Collective::AllReduce)
      .value("REDUCE_SCATTER", Collective::ReduceScatter)
      .value("ALL_GATHER", Collective::AllGather)
      .value("BROADCAST", Collective::Broadcast)
      .value("ALL_REDUCE_Q8", Collective::AllReduceQ8);

  py::class_<DataPlane>(m, "DataPlane")
      .def(py::init<const std::string&, uint16_t, int>(), py::arg("host"), py::arg("port"), py::arg("connections"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("port", &DataPlane::port)
      .def_property_readonly("connections", &DataPlane::connections)
      .def_property_readonly("shm_links_accepted", &DataPlane::shm_links_accepted,
                             "Incoming ring links set up over shared memory so far.")
      .def(
          "set_epoch",
          [](DataPlane& d, uint64_t epoch, uint64_t my_id, int rank, int world_size, uint64_t next_id,
             const std::string& next_host, uint16_t next_port, uint64_t prev_id, const py::bytes& key,
             bool keep_previous_key, bool shm, int connections,
             const std::vector<std::tuple<int, int, int, uint64_t, std::string, uint16_t, uint64_t>>& rings) {
            net::EpochInfo info;
            info.epoch = epoch;
            info.my_id = my_id;
            info.rank = rank;
            info.world_size = world_size;
            info.next_id = next_id;
            info.next_host = next_host;
            info.next_port = next_port;
            info.prev_id = prev_id;
            info.key = key;
            info.keep_previous_key = keep_previous_key;
            info.shm = shm;
            info.connections = connections;
            std::vector<net::EpochInfo> sub;
            for (const auto& [ring, r_rank, r_size, r_next, r_host, r_port, r_prev] : rings) {
              if (ring < 1 || ring > 2) throw py::value_error("sub-ring ids are 1 (region) and 2 (cross-region)");
              net::EpochInfo s;
              s.ring = static_cast<uint8_t>(ring);
              s.rank = r_rank;
              s.world_size = r_size;
              s.next_id = r_next;
              s.next_host = r_host;
              s.next_port = r_port;
              s.prev_id = r_prev;
              sub.push_back(s);
            }
            py::gil_scoped_release release;
            d.set_epoch(info, sub);
          },
          py::arg("epoch"), py::arg("my_id"), py::arg("rank"), py::arg("world_size"), py::arg("next_id"),
          py::arg("next_host"), py::arg("next_port"), py::arg("prev_id"), py::arg("key") = py::bytes(),
          py::arg("keep_previous_key") = true, py::arg("shm") = false, py::arg("connections") = 0,
          py::arg("rings") = std::vector<std::tuple<int, int, int, uint64_t, std::string, uint16_t, uint64_t>>{})
      .def("link_connections", &DataPlane::link_connections, py::call_guard<py::gil_scoped_release>(),
           "Outgoing connections of the current epoch's link.")
      .def("set_source_host", &DataPlane::set_source_host, py::arg("host"),
           "Bind outgoing data connections (links, probes) to this local address.")
      .def(
          "probe",
          [](DataPlane& d, const std::string& host, uint16_t port, int connections, int pings, double seconds,
             uint64_t max_bytes, double timeout_s) {
            net::ProbeReport r;
            {
              py::gil_scoped_release release;
              try {
                r = d.probe(host, port, connections, pings, seconds, max_bytes, timeout_s);
              } catch (const net::SocketError& e) {
                py::gil_scoped_acquire acquire;
                throw std::runtime_error(std::string("link probe to ") + host + ":" + std::to_string(port) +
                                         " failed: " + e.what());
              }
            }
            return py::make_tuple(r.rtt_s, r.bandwidth, r.bytes);
          },
          py::arg("host"), py::arg("port"), py::arg("connections"), py::arg("pings"), py::arg("seconds"),
          py::arg("max_bytes"), py::arg("timeout_s") = 10.0, "Measure the path to a data port: (rtt seconds, bytes/s, bytes sent).")
      .def("set_authenticate", &DataPlane::set_authenticate, py::arg("on"),
           "Require a proof of epoch membership on every incoming connection (a run with a secret).")
      .def("set_link_timeouts", &DataPlane::set_link_timeouts, py::arg("keepalive_s"), py::arg("link_timeout_s"),
           py::call_guard<py::gil_scoped_release>())
      .def("abort_through", &DataPlane::abort_through, py::arg("epoch"), py::arg("why"),
           py::call_guard<py::gil_scoped_release>())
      .def("close", &DataPlane::close, py::call_guard<py::gil_scoped_release>())
      .def(
          "collective",
          [](DataPlane& d, Collective kind, int root, uint64_t epoch, uint32_t tag, uint64_t seq, uintptr_t input,
             uintptr_t work, size_t count, int dtype, int op) {
            const DType t = to_dtype(dtype);
            const RedOp o = to_redop(op);
            OpResult r;
            {
              py::gil_scoped_release release;
              r = d.collective(kind, root, epoch, tag, seq, reinterpret_cast<const void*>(input),
                               reinterpret_cast<void*>(work), count, t, o);
            }
            return py::make_tuple(r.status.kind, r.status.message, r.tx_bytes, r.rx_bytes);
          },
          py::arg("kind"), py::arg("root"), py::arg("epoch"), py::arg("tag"), py::arg("seq"), py::arg("input"),
          py::arg("work"), py::arg("count"), py::arg("dtype"), py::arg("op"),
          "Run one ring collective; returns (FailKind, message, tx_bytes, rx_bytes).")
      .def(
          "all_reduce_two_level",
          [](DataPlane& d, uint64_t epoch, uint32_t tag, uint64_t seq, uintptr_t input, uintptr_t work, size_t count,
             int dtype, int op) {
            const DType t = to_dtype(dtype);
            const RedOp o = to_redop(op);
            OpResult r;
            {
              py::gil_scoped_release release;
              r = d.all_reduce_two_level(epoch, tag, seq, reinterpret_cast<const void*>(input),
                                         reinterpret_cast<void*>(work), count, t, o);
            }
            return py::make_tuple(r.status.kind, r.status.message, r.tx_bytes, r.rx_bytes);
          },
          py::arg("epoch"), py::arg("tag"), py::arg("seq"), py::arg("input"), py::arg("work"), py::arg("count"),
          py::arg("dtype"), py::arg("op"),
          "All-reduce over the epoch's region and cross-region rings; returns like collective().")
      .def(
          "state_publish",
          [](DataPlane& d, const std::vector<std::tuple<uintptr_t, uint64_t, uint64_t>>& keys) {
            std::vector<state::PublishedKey> ks;
            ks.reserve(keys.size());
            for (auto& [ptr, nbytes, hash] : keys) ks.push_back({reinterpret_cast<const void*>(ptr), nbytes, hash});
            py::gil_scoped_release release;
            d.state_server().publish(std::move(ks));
          },
          py::arg("keys"), "Serve these (address, nbytes, hash) buffers, by index, until state_unpublish().")
      .def(
          "state_unpublish", [](DataPlane& d) { return d.state_server().unpublish(); },
          py::call_guard<py::gil_scoped_release>(), "Stop serving; returns the bytes served.");

  m.def(
      "copy",
      [](uintptr_t dst, uintptr_t src, size_t nbytes) {
        py::gil_scoped_release release;
        if (nbytes > 0) std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), "memmove without the GIL (commits large results).");

  m.def(
      "reduce",
      [](uintptr_t dst, uintptr_t src, size_t count, int dtype, int op, bool final_step, int world_size) {
        const DType t = to_dtype(dtype);
        const RedOp o = to_redop(op);
        py::gil_scoped_release release;
        if (final_step) reduce_final(t, o, reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), count, world_size);
        else reduce_step(t, o, reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), count);
      },
      py::arg("dst"), py::arg("src"), py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("final_step") = false,
      py::arg("world_size") = 1, "dst = op(dst, src) elementwise; exposed for tests and benchmarks.");

  m.def(
      "content_hash",
      [](uintptr_t ptr, size_t nbytes, unsigned threads) {
        py::gil_scoped_release release;
        return content_hash(reinterpret_cast<const void*>(ptr), nbytes, threads);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("threads") = 0,
      "64-bit content hash (block-wise XXH64) of a buffer; threads=0 uses up to all cores.");

  m.def(
      "xxh64",
      [](py::bytes data, uint64_t seed) {
        std::string_view v = data;
        return xxh64(v.data(), v.size(), seed);
      },
      py::arg("data"), py::arg("seed") = 0, "Plain XXH64 of a bytes object (for tests).");

  m.def(
      "fetch_state",
      [](const std::vector<std::tuple<uint64_t, std::string, uint16_t>>& holders,
         const std::vector<std::tuple<uint32_t, uint64_t, uintptr_t, uint64_t>>& targets, int connections_per_holder,
         uint64_t piece_bytes, double io_timeout_s, const py::bytes& key, uint64_t epoch) {
        std::vector<state::Holder> hs;
        for (auto& [id, host, port] : holders) hs.push_back({id, host, port});
        std::vector<state::FetchTarget> ts;
        for (auto& [key, hash, ptr, nbytes] : targets) ts.push_back({key, hash, reinterpret_cast<void*>(ptr), nbytes});
        state::FetchOptions opt{connections_per_holder, piece_bytes, io_timeout_s, key, epoch};
        uint64_t rx = 0;
        int64_t bad_key = -1;
        Status st;
        {
          py::gil_scoped_release release;
          st = state::fetch_state(hs, ts, opt, &rx, &bad_key);
        }
        return py::make_tuple(st.kind, st.message, rx, bad_key);
      },
      py::arg("holders"), py::arg("targets"), py::arg("connections_per_holder") = 2, py::arg("piece_bytes") = 4u << 20,
      py::arg("io_timeout_s") = 10.0, py::arg("key") = py::bytes(), py::arg("epoch") = 0,
      "Pull (key index, hash, address, nbytes) targets from (peer_id, host, port) holders; returns (FailKind, message, rx_bytes, index of the key whose hash differed or -1).");

  m.def(
      "hmac_sha256",
      [](const py::bytes& key, const py::bytes& data) {
        const std::string k = key, v = data;
        const Digest d = hmac_sha256(k, {{v.data(), v.size()}});
        return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
      },
      py::arg("key"), py::arg("data"), "HMAC-SHA256 of the core (tests check it against Python's hmac).");

  m.def(
      "quantize_roundtrip",
      [](uintptr_t src, uintptr_t dst, size_t count) {
        std::vector<uint8_t> q(quantized_bytes(count));
        py::gil_scoped_release release;
        if (!quantize_u8(reinterpret_cast<const float*>(src), count, q.data())) return false;
        dequantize_u8(q.data(), count, reinterpret_cast<float*>(dst));
        return true;
      },
      py::arg("src"), py::arg("dst"), py::arg("count"),
      "dst = dequantize(quantize_u8(src)) for float32; False if src holds NaN/Inf (tests, benchmarks).");

  m.def(
      "set_log_level", [](const std::string& name) { log::set_level(log::parse_level(name)); }, py::arg("name"));
}
