// Joint attention sm_90a forward kernels for __nv_bfloat16.
// One translation unit per dtype: ninja builds them in parallel.
// In the sm_80 pass of the build every kernel body is a trap (fwd_sm90.cuh); the host launches them only on 9.x.
#include "joint_attention/fwd_sm90.cuh"

namespace mmk {
namespace ja {

template cudaError_t launch_fwd_sm90<__nv_bfloat16, 64>(const FwdParams&, const Sm90Maps&, cudaStream_t);
template cudaError_t launch_fwd_sm90<__nv_bfloat16, 72>(const FwdParams&, const Sm90Maps&, cudaStream_t);
template cudaError_t launch_fwd_sm90<__nv_bfloat16, 80>(const FwdParams&, const Sm90Maps&, cudaStream_t);
template cudaError_t launch_fwd_sm90<__nv_bfloat16, 96>(const FwdParams&, const Sm90Maps&, cudaStream_t);
template cudaError_t launch_fwd_sm90<__nv_bfloat16, 128>(const FwdParams&, const Sm90Maps&, cudaStream_t);

}  // namespace ja
}  // namespace mmk
