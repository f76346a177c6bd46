// What the .cu files need from PyTorch's CUDA runtime, behind a plain declaration.
//
// The .cu files include only ATen core headers and cuda_runtime.h, so that CI (nvcc,
// no GPU, a CPU build of torch whose c10/cuda headers are incomplete) can compile them;
// the one function that needs c10/cuda lives in cuda/stream.cpp, built with the
// extension's host compiler.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace dsr_kernels {

// PyTorch's current CUDA stream on the current device (c10::cuda::getCurrentCUDAStream).
cudaStream_t current_cuda_stream();

}  // namespace dsr_kernels

// After a kernel launch: a launch error becomes a c10::Error (a Python RuntimeError).
#define DSR_CUDA_LAUNCH_CHECK()                                                                        \
  do {                                                                                                 \
    const cudaError_t dsr_err = cudaGetLastError();                                                    \
    TORCH_CHECK(dsr_err == cudaSuccess, "dsr_kernels CUDA launch failed: ", cudaGetErrorString(dsr_err)); \
  } while (0)
