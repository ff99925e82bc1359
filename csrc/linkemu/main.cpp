// pyccl-linkemu: a compiled link emulator for pyccl's stress tool and
// benchmarks (see emulator.h and docs/architecture.md, "Link emulator").
//
//   pyccl-linkemu [--threads N] [--seed S]
//
// Prints "ready" once listening is possible, then reads commands from stdin
// (control.h) and answers each on stdout. Exits when stdin closes or the
// parent dies, resetting every proxied connection.
#include <sys/prctl.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "linkemu/emulator.h"

int main(int argc, char** argv) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // the emulator is the parent's network: it dies with it
  std::signal(SIGPIPE, SIG_IGN);
  int threads = 2;
  uint64_t seed = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else if (std::strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      std::cerr << "usage: pyccl-linkemu [--threads N] [--seed S]\n";
      return 2;
    }
  }
  pyccl::linkemu::Emulator emu(threads, seed);
  std::cout << "ready" << std::endl;
  for (std::string line; std::getline(std::cin, line);) {
    std::string reply;
    try {
      reply = emu.execute(pyccl::linkemu::parse_command(line));
    } catch (const std::exception& e) {
      reply = std::string("error ") + e.what();
    }
    std::cout << reply << std::endl;
  }
  return 0;
}
