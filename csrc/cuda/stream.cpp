// The current PyTorch CUDA stream for the kernels in csrc/cuda/*.cu (see cuda_utils.h).
#include <c10/cuda/CUDAStream.h>

#include "dsr_kernels/cuda_utils.h"

namespace dsr_kernels {

cudaStream_t current_cuda_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace dsr_kernels
