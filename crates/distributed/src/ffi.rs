//! Raw declarations of `csrc/shim.cpp`. Every function returning `*mut c_char` returns NULL on
//! success and otherwise an error text to be released with [`fdist_free_string`]; [`take_error`]
//! does both. Tensor arguments are tch's `C_tensor` pointers (`at::Tensor*` on the C++ side).

use std::ffi::{c_char, c_int, CStr};
use torch_sys::C_tensor;

/// Opaque C++ `Group` (store + c10d backend).
#[repr(C)]
pub struct Group {
    _private: [u8; 0],
}

extern "C" {
    pub fn fdist_free_string(s: *mut c_char);
    pub fn fdist_new_gloo(
        host: *const c_char,
        port: u16,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        device_host: *const c_char,
        threads: c_int,
        out: *mut *mut Group,
    ) -> *mut c_char;
    pub fn fdist_new_nccl(
        host: *const c_char,
        port: u16,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        device: c_int,
        out: *mut *mut Group,
    ) -> *mut c_char;
    pub fn fdist_free(g: *mut Group);
    pub fn fdist_all_reduce(g: *mut Group, t: *const C_tensor, op: c_int) -> *mut c_char;
    pub fn fdist_broadcast(g: *mut Group, t: *const C_tensor, root: c_int) -> *mut c_char;
    pub fn fdist_all_gather_base(
        g: *mut Group,
        output: *const C_tensor,
        input: *const C_tensor,
    ) -> *mut c_char;
    pub fn fdist_all_gather(
        g: *mut Group,
        outputs: *const *const C_tensor,
        n: c_int,
        input: *const C_tensor,
    ) -> *mut c_char;
    pub fn fdist_reduce_scatter_base(
        g: *mut Group,
        output: *const C_tensor,
        input: *const C_tensor,
        op: c_int,
    ) -> *mut c_char;
    pub fn fdist_barrier(g: *mut Group) -> *mut c_char;
    pub fn fdist_store_set(
        g: *mut Group,
        key: *const c_char,
        value: *const u8,
        len: usize,
    ) -> *mut c_char;
    pub fn fdist_store_get(
        g: *mut Group,
        key: *const c_char,
        value: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
}

/// `Ok(())` for NULL, else the error text (the C string is freed).
///
/// # Safety
/// `err` is NULL or a string returned by the shim that was not freed yet.
pub unsafe fn take_error(err: *mut c_char) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the caller guarantees `err` is a live, NUL-terminated string from the shim, freed
    // once here.
    let text = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .trim()
        .to_string();
    unsafe { fdist_free_string(err) };
    Err(text)
}
