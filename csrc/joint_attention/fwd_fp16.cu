// Joint attention forward kernels for __half (one translation unit per dtype: ninja builds them in parallel).
#include "joint_attention/fwd_kernel.cuh"

namespace mmk {
namespace ja {

template cudaError_t launch_fwd<__half, 64>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd<__half, 72>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd<__half, 80>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd<__half, 96>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd<__half, 128>(const FwdParams&, cudaStream_t);

}  // namespace ja
}  // namespace mmk
