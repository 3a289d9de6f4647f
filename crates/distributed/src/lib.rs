//! Data-parallel building blocks on libtorch's own distributed engine, c10d.
//!
//! `tch` exposes no `torch.distributed`, but the libtorch it links ships c10d: the `TCPStore`
//! rendezvous, `ProcessGroupGloo` (CPU, and CUDA tensors through host copies) and
//! `ProcessGroupNCCL`. A small C++ shim (`csrc/shim.cpp`, compiled by `build.rs` against the same
//! libtorch as torch-sys) exposes them to Rust; this crate wraps it in a safe API:
//!
//! - [`Rendezvous`]: store address, rank, world size, timeout; [`Rendezvous::from_env`] reads
//!   torchrun's (or Slurm's) variables.
//! - [`ProcessGroup`]: [`all_reduce`](ProcessGroup::all_reduce) (sum, avg, max, min, product),
//!   [`all_reduce_bucketed`](ProcessGroup::all_reduce_bucketed) for gradient lists,
//!   [`all_gather`](ProcessGroup::all_gather), [`all_gather_cat`](ProcessGroup::all_gather_cat),
//!   [`reduce_scatter`](ProcessGroup::reduce_scatter), [`broadcast`](ProcessGroup::broadcast),
//!   [`barrier`](ProcessGroup::barrier).
//!
//! Every failure (a refused connection, a timeout, a dead peer, a bad tensor) is an
//! [`anyhow::Error`] naming the operation and this rank, and, when a peer on this machine has
//! exited, that peer's rank. Nothing blocks longer than [`Rendezvous::timeout`]. A world of one
//! ([`ProcessGroup::single`]) goes through the same API with an in-memory store.
//!
//! Collectives must be issued in the same order on every rank (c10d's contract). After a
//! collective failed the group is unusable: drop it (and usually exit non-zero).
//!
//! Build and launch: `docs/distributed.md`.

mod ffi;
mod peers;
pub mod rendezvous;

pub use rendezvous::Rendezvous;

use anyhow::{anyhow, bail, Result};
use std::cell::RefCell;
use std::ffi::{c_int, CString};
use std::ptr::NonNull;
use std::time::Duration;
use tch::{Device, Tensor};

/// Whether this build has the NCCL backend (cargo feature `nccl`).
pub const NCCL_COMPILED: bool = cfg!(feature = "nccl");

/// The c10d backend behind a [`ProcessGroup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Gloo over TCP: CPU tensors (CUDA tensors are staged through host memory).
    Gloo,
    /// NCCL: CUDA tensors on `cuda:local_rank`. Needs the `nccl` feature, else
    /// [`ProcessGroup::new`] returns an error.
    Nccl,
}

impl Backend {
    /// NCCL for a CUDA device when this build has it, Gloo otherwise.
    pub fn for_device(device: Device) -> Self {
        if NCCL_COMPILED && device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        })
    }
}

/// How [`ProcessGroup::all_reduce`] and [`ProcessGroup::reduce_scatter`] combine the ranks'
/// values element-wise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Sum over ranks.
    Sum,
    /// Mean over ranks (floating tensors only). NCCL does it natively; on Gloo, which has no
    /// average, it is a sum followed by a division by the world size.
    Avg,
    /// Maximum over ranks.
    Max,
    /// Minimum over ranks.
    Min,
    /// Product over ranks.
    Product,
}

impl ReduceOp {
    fn code(self) -> c_int {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Avg => 1,
            ReduceOp::Max => 2,
            ReduceOp::Min => 3,
            ReduceOp::Product => 4,
        }
    }
}

/// One process's membership of a group: a c10d store plus a Gloo or NCCL backend.
///
/// `Send` (it may move to another thread) but not `Sync`: collectives must be issued in one
/// order on every rank, so one thread at a time issues them.
#[derive(Debug)]
pub struct ProcessGroup {
    raw: NonNull<ffi::Group>,
    rank: usize,
    world_size: usize,
    local_rank: usize,
    backend: Backend,
    timeout: Duration,
    peers: Vec<peers::Peer>,
    /// Flat buffers of `all_reduce_bucketed`, reused while the layout stays the same.
    buckets: RefCell<Vec<Tensor>>,
}

// SAFETY: the C++ group may be used from any thread; `&mut`-free methods take `&self` but the type
// is not `Sync`, so no two threads call into it at once.
unsafe impl Send for ProcessGroup {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is freed once.
        unsafe { ffi::fdist_free(self.raw.as_ptr()) }
    }
}

impl ProcessGroup {
    /// A world of one process (Gloo, in-memory store): every collective is the identity.
    pub fn single() -> Result<Self> {
        Self::new(&Rendezvous::single(), Backend::Gloo)
    }

    /// Join the group described by `rv`: rank 0 starts the TCPStore on `master_port` and every
    /// rank connects to it, then the backend connects every pair of ranks. Returns when all
    /// `world_size` ranks have joined, or an error after at most `rv.timeout` (nobody listening
    /// on the port, a missing rank, a world size that differs between ranks, ...).
    pub fn new(rv: &Rendezvous, backend: Backend) -> Result<Self> {
        rv.validate()?;
        let host = CString::new(rv.master_addr.as_str())
            .map_err(|_| anyhow!("master address contains a NUL byte"))?;
        let bind = CString::new(rv.bind_addr.clone().unwrap_or_default())
            .map_err(|_| anyhow!("bind address contains a NUL byte"))?;
        let timeout_ms = rv.timeout.as_millis().clamp(1, i64::MAX as u128) as i64;
        let mut raw: *mut ffi::Group = std::ptr::null_mut();
        let where_ = format!(
            "{backend} process group: rank {} of {} with the store at {}:{} (timeout {:.1} s)",
            rv.rank,
            rv.world_size,
            rv.master_addr,
            rv.master_port,
            rv.timeout.as_secs_f64()
        );
        // SAFETY: the strings outlive the call; `raw` is written by the shim.
        let res = unsafe {
            match backend {
                Backend::Gloo => ffi::take_error(ffi::fdist_new_gloo(
                    host.as_ptr(),
                    rv.master_port,
                    rv.rank as c_int,
                    rv.world_size as c_int,
                    timeout_ms,
                    bind.as_ptr(),
                    0,
                    &mut raw,
                )),
                Backend::Nccl => ffi::take_error(ffi::fdist_new_nccl(
                    host.as_ptr(),
                    rv.master_port,
                    rv.rank as c_int,
                    rv.world_size as c_int,
                    timeout_ms,
                    rv.local_rank as c_int,
                    &mut raw,
                )),
            }
        };
        res.map_err(|e| anyhow!("joining the {where_}: {e}"))?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| anyhow!("joining the {where_}: the shim returned no group"))?;
        let mut pg = Self {
            raw,
            rank: rv.rank,
            world_size: rv.world_size,
            local_rank: rv.local_rank,
            backend,
            timeout: rv.timeout,
            peers: vec![],
            buckets: RefCell::new(vec![]),
        };
        if pg.world_size > 1 {
            pg.peers = peers::exchange(&pg)
                .map_err(|e| anyhow!("joining the {where_}: exchanging peer identities (a rank that never publishes one failed to join, or the ranks disagree on the world size): {e:#}"))?;
        }
        Ok(pg)
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes in the group.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank on this machine (the CUDA device index under NCCL).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Whether this process is rank 0 (logging, checkpoints, evaluation).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The bound on every call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Reduce `t` element-wise over all ranks, in place: afterwards every rank holds the result.
    ///
    /// # Shapes
    /// Any shape, the same on every rank; `t` must be contiguous.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        let what = "all_reduce";
        self.check_tensor(what, t, true)?;
        self.check_avg(what, t, op)?;
        // SAFETY: `t` is a live tensor for the duration of the call.
        let res = unsafe {
            ffi::take_error(ffi::fdist_all_reduce(
                self.raw.as_ptr(),
                t.as_ptr(),
                op.code(),
            ))
        };
        self.finish(what, res)
    }

    /// All-reduce a list of tensors (typically gradients) by packing them into flat buckets of
    /// at most `bucket_bytes` (a tensor larger than that is a bucket of its own), one collective
    /// per bucket, then copying the results back. Tensors may have any layout; consecutive
    /// tensors of the same kind and device share a bucket. The bucket buffers are kept for the
    /// next call with the same layout (no allocation per step).
    pub fn all_reduce_bucketed(
        &self,
        tensors: &mut [Tensor],
        op: ReduceOp,
        bucket_bytes: usize,
    ) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut buffers = self.buckets.borrow_mut();
        let mut start = 0;
        let mut index = 0;
        while start < tensors.len() {
            let (kind, device) = (tensors[start].kind(), tensors[start].device());
            let elt = kind.elt_size_in_bytes();
            let mut end = start;
            let mut numel = 0usize;
            while end < tensors.len()
                && tensors[end].kind() == kind
                && tensors[end].device() == device
                && (end == start || (numel + tensors[end].numel()) * elt <= bucket_bytes)
            {
                numel += tensors[end].numel();
                end += 1;
            }
            let fits = buffers.get(index).is_some_and(|b: &Tensor| {
                b.numel() == numel && b.kind() == kind && b.device() == device
            });
            if !fits {
                buffers.truncate(index);
                buffers.push(Tensor::empty([numel as i64], (kind, device)));
            }
            let flat = &mut buffers[index];
            let bucket = &mut tensors[start..end];
            let mut offset = 0i64;
            for t in bucket.iter() {
                let n = t.numel() as i64;
                flat.narrow(0, offset, n).view(t.size().as_slice()).copy_(t);
                offset += n;
            }
            self.all_reduce(flat, op).map_err(|e| {
                e.context(format!(
                    "bucket of tensors {start}..{end} ({} bytes)",
                    numel * elt
                ))
            })?;
            let mut offset = 0i64;
            for t in bucket.iter_mut() {
                let n = t.numel() as i64;
                t.copy_(&flat.narrow(0, offset, n).view(t.size().as_slice()));
                offset += n;
            }
            start = end;
            index += 1;
        }
        Ok(())
    }

    /// Gather `t` from every rank: element `r` of the result is rank r's tensor.
    ///
    /// # Shapes
    /// `t`: any shape, the same on every rank. Result: `world_size` tensors of that shape.
    pub fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let what = "all_gather";
        let input = t.contiguous();
        self.check_tensor(what, &input, false)?;
        let outputs: Vec<Tensor> = (0..self.world_size).map(|_| input.empty_like()).collect();
        let ptrs: Vec<*const torch_sys::C_tensor> = outputs.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: the tensors and the pointer array live until the call returns.
        let res = unsafe {
            ffi::take_error(ffi::fdist_all_gather(
                self.raw.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                input.as_ptr(),
            ))
        };
        self.finish(what, res)?;
        Ok(outputs)
    }

    /// Gather `t` from every rank into one tensor, rank order along the first dimension (one
    /// collective into a single buffer, c10d's `_allgather_base`).
    ///
    /// # Shapes
    /// `t`: `[n, ...]`, the same on every rank -> `[world_size * n, ...]`. A 0-d `t` gives
    /// `[world_size]`.
    pub fn all_gather_cat(&self, t: &Tensor) -> Result<Tensor> {
        let what = "all_gather_cat";
        let input = t.contiguous();
        self.check_tensor(what, &input, false)?;
        let mut shape = input.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world_size as i64;
        let output = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        // SAFETY: both tensors live until the call returns.
        let res = unsafe {
            ffi::take_error(ffi::fdist_all_gather_base(
                self.raw.as_ptr(),
                output.as_ptr(),
                input.as_ptr(),
            ))
        };
        self.finish(what, res)?;
        Ok(output)
    }

    /// Reduce over ranks, then scatter: rank r receives the reduction of block r of `input`.
    ///
    /// # Shapes
    /// `input`: `[world_size * n, ...]`, the same on every rank -> `[n, ...]`.
    pub fn reduce_scatter(&self, input: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let what = "reduce_scatter";
        let input = input.contiguous();
        self.check_tensor(what, &input, false)?;
        self.check_avg(what, &input, op)?;
        let mut shape = input.size();
        let w = self.world_size as i64;
        if shape.is_empty() || shape[0] % w != 0 {
            bail!(
                "{what} on rank {} of {}: the first dimension of the input {:?} must be a multiple of the world size {w}",
                self.rank,
                self.world_size,
                shape
            );
        }
        shape[0] /= w;
        let output = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        // SAFETY: both tensors live until the call returns.
        let res = unsafe {
            ffi::take_error(ffi::fdist_reduce_scatter_base(
                self.raw.as_ptr(),
                output.as_ptr(),
                input.as_ptr(),
                op.code(),
            ))
        };
        self.finish(what, res)?;
        Ok(output)
    }

    /// Overwrite `t` on every rank with rank `root`'s `t` (in place; autograd is not involved).
    ///
    /// # Shapes
    /// Any shape, the same on every rank; `t` must be contiguous.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let what = "broadcast";
        if root >= self.world_size {
            bail!(
                "{what}: root rank {root} is out of range for world size {}",
                self.world_size
            );
        }
        self.check_tensor(what, t, true)?;
        // SAFETY: `t` is a live tensor for the duration of the call.
        let res = unsafe {
            ffi::take_error(ffi::fdist_broadcast(
                self.raw.as_ptr(),
                t.as_ptr(),
                root as c_int,
            ))
        };
        self.finish(what, res)
    }

    /// Block until every rank has reached this barrier (bounded by the timeout).
    pub fn barrier(&self) -> Result<()> {
        // SAFETY: the group is alive.
        let res = unsafe { ffi::take_error(ffi::fdist_barrier(self.raw.as_ptr())) };
        self.finish("barrier", res)
    }

    /// Store `value` under `key` in the rendezvous store (visible to every rank).
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = CString::new(key).map_err(|_| anyhow!("store key {key:?} contains a NUL byte"))?;
        // SAFETY: key and value outlive the call.
        let res = unsafe {
            ffi::take_error(ffi::fdist_store_set(
                self.raw.as_ptr(),
                k.as_ptr(),
                value.as_ptr(),
                value.len(),
            ))
        };
        res.map_err(|e| {
            anyhow!(
                "store set {key:?} on rank {} of {}: {e}",
                self.rank,
                self.world_size
            )
        })
    }

    /// Read `key` from the rendezvous store, waiting (up to the timeout) until some rank set it.
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>> {
        let k = CString::new(key).map_err(|_| anyhow!("store key {key:?} contains a NUL byte"))?;
        let mut ptr: *mut u8 = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: the shim allocates `ptr` with malloc on success; it is copied, then freed.
        unsafe {
            let res = ffi::take_error(ffi::fdist_store_get(
                self.raw.as_ptr(),
                k.as_ptr(),
                &mut ptr,
                &mut len,
            ));
            res.map_err(|e| {
                anyhow!(
                    "store get {key:?} on rank {} of {}: {e}",
                    self.rank,
                    self.world_size
                )
            })?;
            let out = std::slice::from_raw_parts(ptr, len).to_vec();
            ffi::fdist_free_string(ptr.cast());
            Ok(out)
        }
    }

    fn check_tensor(&self, what: &str, t: &Tensor, in_place: bool) -> Result<()> {
        let ctx = || format!("{what} on rank {} of {}", self.rank, self.world_size);
        if !t.defined() {
            bail!("{}: the tensor is undefined", ctx());
        }
        if in_place && !t.is_contiguous() {
            bail!("{}: the tensor must be contiguous (it is written in place; use all_reduce_bucketed or copy into a contiguous tensor)", ctx());
        }
        match (self.backend, t.device()) {
            (Backend::Nccl, Device::Cuda(_)) | (Backend::Gloo, _) => Ok(()),
            (Backend::Nccl, d) => bail!(
                "{}: the NCCL backend needs CUDA tensors, got one on {d:?}",
                ctx()
            ),
        }
    }

    fn check_avg(&self, what: &str, t: &Tensor, op: ReduceOp) -> Result<()> {
        if op == ReduceOp::Avg && !t.is_floating_point() {
            bail!(
                "{what} on rank {} of {}: ReduceOp::Avg needs a floating-point tensor, got {:?}",
                self.rank,
                self.world_size,
                t.kind()
            );
        }
        Ok(())
    }

    fn finish(&self, what: &str, res: Result<(), String>) -> Result<()> {
        res.map_err(|e| {
            let diagnosis = peers::diagnose(&self.peers, self.rank);
            anyhow!(
                "{what} failed on rank {} of {} ({}): {e}{diagnosis}",
                self.rank,
                self.world_size,
                self.backend
            )
        })
    }
}
