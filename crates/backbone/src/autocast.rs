//! CUDA autocast in a chosen dtype (fp16 or bf16) for the backbones' trunks.
//!
//! `tch::autocast(enabled, f)` switches libtorch's CUDA autocast on but always in its global dtype
//! (fp16 by default); tch 0.26 does not wrap `at::autocast::set_autocast_dtype`, so this module
//! calls it by its exported symbol. [`with_cuda_autocast`] is the one place that sets the dtype,
//! switches autocast on, and restores both afterwards. Without CUDA, autocast changes nothing.

use tch::Kind;

// libtorch's `at::autocast::{get,set}_autocast_dtype(c10::DeviceType, c10::ScalarType)`. Both enums
// are `int8_t`-backed, so the C++ functions take two small integers in registers exactly like these
// C declarations (x86-64 and aarch64 Itanium ABI).
extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_get_autocast_dtype(device_type: i8) -> i8;
}

/// `c10::DeviceType::CUDA`.
const CUDA_DEVICE_TYPE: i8 = 1;

/// The dtype CUDA autocast casts to (`Kind::Half` unless changed).
pub fn cuda_autocast_kind() -> Kind {
    // SAFETY: a plain getter of a global in libtorch_cpu, linked by every crate that links tch.
    let code = unsafe { at_get_autocast_dtype(CUDA_DEVICE_TYPE) };
    match code {
        15 => Kind::BFloat16,
        6 => Kind::Float,
        _ => Kind::Half,
    }
}

fn set_cuda_autocast_kind(kind: Kind) {
    // c10::ScalarType codes.
    let code: i8 = match kind {
        Kind::BFloat16 => 15,
        Kind::Float => 6,
        _ => 5,
    };
    // SAFETY: a plain setter of a global in libtorch_cpu.
    unsafe { at_set_autocast_dtype(CUDA_DEVICE_TYPE, code) }
}

/// Run `f` under CUDA autocast in `dtype` (`Kind::Half` or `Kind::BFloat16`), restoring the previous
/// dtype afterwards; with `None`, just `f()` (no FFI call at all).
pub fn with_cuda_autocast<T>(dtype: Option<Kind>, f: impl FnOnce() -> T) -> T {
    let Some(kind) = dtype else { return f() };
    let before = cuda_autocast_kind();
    set_cuda_autocast_kind(kind);
    let out = tch::autocast(true, f);
    set_cuda_autocast_kind(before);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The libtorch autocast-dtype setter is reachable and round-trips (no GPU needed: it only
    /// sets the dtype CUDA autocast would use).
    #[test]
    fn autocast_dtype_switch_round_trips() {
        assert_eq!(
            cuda_autocast_kind(),
            Kind::Half,
            "libtorch's default CUDA autocast dtype"
        );
        let inside = with_cuda_autocast(Some(Kind::BFloat16), cuda_autocast_kind);
        assert_eq!(inside, Kind::BFloat16);
        assert_eq!(cuda_autocast_kind(), Kind::Half, "restored");
    }
}
