//! GPU checks (features `nccl` and `cuda-tests`), for a machine with CUDA:
//! `cargo xtask test -p facerec-distributed --features nccl,cuda-tests --test cuda`.
//!
//! - NCCL in a world of one on cuda:0 (every collective is the identity, AVG is NCCL's own);
//! - Gloo with CUDA tensors on 2 processes sharing cuda:0 (c10d stages them through the host);
//! - NCCL on 2 processes, one GPU each, when the machine has two GPUs (NCCL refuses two ranks on
//!   one GPU), else reported as skipped.
//!
//! Rank r holds `f(r, i) = (r + 1)(i + 1)`, so the sum over W ranks is `(i + 1) W (W + 1) / 2`.

mod common;

use anyhow::{ensure, Result};
use facerec_distributed::{Backend, ProcessGroup, ReduceOp, Rendezvous};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn data(r: usize, n: i64, device: Device) -> Tensor {
    (Tensor::arange(n, (Kind::Float, device)) + 1.0) * (r as f64 + 1.0)
}

fn check_sum(pg: &ProcessGroup, device: Device) -> Result<()> {
    let (r, w, n) = (pg.rank(), pg.world_size(), 5);
    let mut t = data(r, n, device);
    pg.all_reduce(&mut t, ReduceOp::Sum)?;
    let want = (Tensor::arange(n, (Kind::Float, device)) + 1.0) * ((w * (w + 1) / 2) as f64);
    ensure!(t.equal(&want), "all_reduce Sum on {device:?}: {t:?}");
    let mut t = data(r, n, device);
    pg.all_reduce(&mut t, ReduceOp::Avg)?;
    let want = &want / w as f64;
    ensure!(
        f64::try_from((&t - &want).abs().max())? < 1e-5,
        "all_reduce Avg on {device:?}"
    );
    let cat = pg.all_gather_cat(&data(r, n, device))?;
    let want = Tensor::cat(&(0..w).map(|q| data(q, n, device)).collect::<Vec<_>>(), 0);
    ensure!(cat.equal(&want), "all_gather_cat on {device:?}");
    let mut t = data(r, n, device);
    pg.broadcast(&mut t, w - 1)?;
    ensure!(t.equal(&data(w - 1, n, device)), "broadcast on {device:?}");
    pg.barrier()
}

fn nccl_world_of_one() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    let pg = ProcessGroup::new(&Rendezvous::single(), Backend::Nccl).expect("NCCL world of one");
    check_sum(&pg, Device::Cuda(0)).unwrap();
}

fn worker(backend: Backend) -> Result<()> {
    let rv = Rendezvous::from_env()?;
    let device = Device::Cuda(if backend == Backend::Nccl {
        rv.local_rank
    } else {
        0
    });
    let pg = ProcessGroup::new(&rv, backend)?;
    check_sum(&pg, device)
}

fn spawn(worker: &str) {
    let ranks = common::Ranks::spawn(worker, 2, common::free_port(), |_| {
        vec![("FACEREC_DIST_TIMEOUT".into(), "60".into())]
    });
    ranks.expect_success(Duration::from_secs(120));
}

fn gloo_cuda_tensors_2_ranks() {
    spawn("gloo");
}

fn nccl_2_ranks() {
    if tch::Cuda::device_count() < 2 {
        println!(
            "  skipped: NCCL needs one GPU per rank and this machine has {}",
            tch::Cuda::device_count()
        );
        return;
    }
    spawn("nccl");
}

fn main() {
    common::main(
        &[
            ("nccl_world_of_one", nccl_world_of_one),
            ("gloo_cuda_tensors_2_ranks", gloo_cuda_tensors_2_ranks),
            ("nccl_2_ranks", nccl_2_ranks),
        ],
        &[
            ("gloo", || worker(Backend::Gloo)),
            ("nccl", || worker(Backend::Nccl)),
        ],
    );
}
