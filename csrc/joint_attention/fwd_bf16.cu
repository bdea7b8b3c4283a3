// Joint attention forward kernels for __nv_bfloat16 (one translation unit per dtype: ninja builds them in parallel).
#include "joint_attention/fwd_kernel.cuh"

namespace mmk {
namespace ja {

template cudaError_t launch_fwd<__nv_bfloat16, 64>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd<__nv_bfloat16, 72>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd<__nv_bfloat16, 80>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd<__nv_bfloat16, 96>(const FwdParams&, cudaStream_t);
template cudaError_t launch_fwd<__nv_bfloat16, 128>(const FwdParams&, cudaStream_t);

}  // namespace ja
}  // namespace mmk
