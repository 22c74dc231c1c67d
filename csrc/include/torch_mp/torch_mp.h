#pragma once

// The public C++ API of torch_mp. Link with TorchMP::torch_mp (CMake: find_package(TorchMP)).
#include <torch_mp/checkpoint.h>
#include <torch_mp/comm.h>
#include <torch_mp/ops.h>
#include <torch_mp/nn.h>
#include <torch_mp/pipeline.h>
#include <torch_mp/pipeline_parallel.h>
#include <torch_mp/planner.h>
#include <torch_mp/split.h>
#include <torch_mp/tensor_parallel.h>
#include <torch_mp/training.h>
