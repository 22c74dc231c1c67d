#include <torch/library.h>

// The one TORCH_LIBRARY block of torch_mp. Each op family adds its schemas from its own file with
// TORCH_LIBRARY_FRAGMENT (csrc/ops/<op>.cpp).
TORCH_LIBRARY(torch_mp, m) {}
