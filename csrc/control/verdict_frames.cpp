// A msgpack subset: maps of at most 15 entries whose keys are short
// strings and whose values are short strings or non-negative integers.
// That is all `op_ok`, `heartbeat` and `done` ever are.
#include "control/verdict_frames.h"

#include <cstring>
#include <string_view>

namespace pyccl::control {

namespace {

class Reader {
 public:
  Reader(const uint8_t* p, size_t n) : p_(p), end_(p + n) {}
  bool at_end() const { return p_ == end_; }

  // fixstr or str8 (msgpack-python writes str8 only above 31 bytes).
  bool str(std::string_view* out) {
    if (p_ == end_) return false;
    size_t len;
    if ((*p_ & 0xE0) == 0xA0) {
      len = *p_ & 0x1F;
      ++p_;
    } else if (*p_ == 0xD9 && end_ - p_ >= 2) {
      len = p_[1];
      p_ += 2;
    } else {
      return false;
    }
    if (static_cast<size_t>(end_ - p_) < len) return false;
    *out = std::string_view(reinterpret_cast<const char*>(p_), len);
    p_ += len;
    return true;
  }

  // Any msgpack integer encoding whose value is >= 0 (Python reads them all as int).
  bool uint(uint64_t* out) {
    if (p_ == end_) return false;
    const uint8_t t = *p_++;
    if (t <= 0x7F) {
      *out = t;
      return true;
    }
    size_t width;
    bool is_signed;
    switch (t) {
      case 0xCC: width = 1, is_signed = false; break;
      case 0xCD: width = 2, is_signed = false; break;
      case 0xCE: width = 4, is_signed = false; break;
      case 0xCF: width = 8, is_signed = false; break;
      case 0xD0: width = 1, is_signed = true; break;
      case 0xD1: width = 2, is_signed = true; break;
      case 0xD2: width = 4, is_signed = true; break;
      case 0xD3: width = 8, is_signed = true; break;
      default: return false;
    }
    if (static_cast<size_t>(end_ - p_) < width) return false;
    uint64_t v = 0;
    for (size_t i = 0; i < width; ++i) v = (v << 8) | p_[i];
    p_ += width;
    if (is_signed && (v >> (8 * width - 1)) & 1) return false;  // negative
    *out = v;
    return true;
  }

  bool fixmap(size_t* entries) {
    if (p_ == end_ || (*p_ & 0xF0) != 0x80) return false;
    *entries = *p_++ & 0x0F;
    return true;
  }

 private:
  const uint8_t* p_;
  const uint8_t* end_;
};

void put_str(std::string& out, std::string_view s) {
  out.push_back(static_cast<char>(0xA0 | s.size()));  // every string here is < 32 bytes
  out.append(s);
}

// The shortest encoding, as msgpack-python picks it for a non-negative int.
void put_uint(std::string& out, uint64_t v) {
  auto big_endian = [&](uint8_t tag, int width) {
    out.push_back(static_cast<char>(tag));
    for (int i = width - 1; i >= 0; --i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  };
  if (v <= 0x7F) out.push_back(static_cast<char>(v));
  else if (v <= 0xFF) big_endian(0xCC, 1);
  else if (v <= 0xFFFF) big_endian(0xCD, 2);
  else if (v <= 0xFFFFFFFFull) big_endian(0xCE, 4);
  else big_endian(0xCF, 8);
}

}  // namespace

FastFrame classify(const uint8_t* body, size_t n, VerdictKey* key) {
  Reader r(body, n);
  size_t entries;
  if (!r.fixmap(&entries)) return FastFrame::Other;
  std::string_view type;
  uint64_t epoch = 0, tag = 0, seq = 0;
  int seen = 0;  // bit per field; a repeated key goes to Python, which keeps msgpack's last-wins
  for (size_t i = 0; i < entries; ++i) {
    std::string_view k;
    if (!r.str(&k)) return FastFrame::Other;
    int bit;
    bool ok;
    if (k == "type") bit = 1, ok = r.str(&type);
    else if (k == "epoch") bit = 2, ok = r.uint(&epoch);
    else if (k == "tag") bit = 4, ok = r.uint(&tag);
    else if (k == "seq") bit = 8, ok = r.uint(&seq);
    else return FastFrame::Other;
    if (!ok || (seen & bit)) return FastFrame::Other;
    seen |= bit;
  }
  if (!r.at_end()) return FastFrame::Other;
  if (seen == 1 && type == "heartbeat") return FastFrame::Heartbeat;
  if (seen == 15 && type == "op_ok" && epoch <= kMaxInt && tag <= kMaxTag && seq <= kMaxInt) {
    *key = VerdictKey{epoch, tag, seq};
    return FastFrame::OpOk;
  }
  return FastFrame::Other;  // out of range or another frame: Python says what is wrong with it
}

std::string encode_done(const VerdictKey& key) {
  std::string out(4, '\0');
  out.push_back(static_cast<char>(0x84));
  put_str(out, "type");
  put_str(out, "done");
  put_str(out, "epoch");
  put_uint(out, key.epoch);
  put_str(out, "tag");
  put_uint(out, key.tag);
  put_str(out, "seq");
  put_uint(out, key.seq);
  const uint32_t n = static_cast<uint32_t>(out.size() - 4);
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((n >> (8 * (3 - i))) & 0xFF);
  return out;
}

}  // namespace pyccl::control
