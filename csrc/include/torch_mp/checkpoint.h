#pragma once

#include <string>

#include <torch/nn/module.h>

namespace torch_mp {

// The C++ face of torch_mp.save for a single-process module: its parameters and buffers under
// their names ("0.weight", ...) and the CPU random state, in the same format (a safetensors file and
// the JSON index torch_mp_checkpoint.json), written as `path`.incomplete, fsynced, then renamed to
// `path`, replacing an earlier checkpoint there only once the new one is complete. Python's
// torch_mp.load reads it, also into a tensor-parallel model. `path` is a folder. Errors:
// c10::ValueError for a tensor dtype the format does not hold, or when `path` exists and is not a
// checkpoint (it is never replaced then); c10::Error when a file cannot be created, written or
// fsynced (the message carries the system's reason).
void save(const torch::nn::Module& module, const std::string& path);

// The C++ face of torch_mp.load: loads a checkpoint written by torch_mp::save or torch_mp.save (by
// any number of ranks: the pieces are joined) into `module`, and restores the CPU random state when
// one process wrote it. Every parameter and buffer must be present with its shape, and no other
// tensor; each piece's shape and CRC-32 are checked. Errors are c10::ValueError naming the key or file.
void load(torch::nn::Module& module, const std::string& path);

} // namespace torch_mp
