//! Collectives over Gloo on 127.0.0.1 with 2 and 3 processes (and a world of one), f32 and f64.
//!
//! Rank r's data is a known function of r and of the element index i,
//! `f(r, i) = (r + 1)(i + 1) / 2 - r`, so every expected result has a closed form:
//! - sum over r in 0..W: `(i + 1) W (W + 1) / 4 - W (W - 1) / 2`;
//! - f is linear in r, so max and min over r are at r = 0 or r = W - 1;
//! - avg = sum / W.
//!
//! The values are multiples of 1/2 below 100, exact in f32 and f64 whatever the summation order,
//! so sums, maxima, gathers and broadcasts are compared exactly; averages to 1e-6 (f32).
//!
//! Each rank checks its own result and exits non-zero with a message naming the check if a value
//! differs; the parent reports that rank's stderr. Run: `cargo xtask test -p facerec-distributed
//! --test collectives`.

mod common;

use anyhow::{bail, ensure, Result};
use facerec_distributed::{Backend, ProcessGroup, ReduceOp, Rendezvous};
use std::time::Duration;
use tch::{Kind, Tensor};

fn f(r: usize, i: usize) -> f64 {
    (r as f64 + 1.0) * (i as f64 + 1.0) / 2.0 - r as f64
}

fn sum_over_ranks(w: usize, i: usize) -> f64 {
    let (w, i) = (w as f64, i as f64);
    (i + 1.0) * w * (w + 1.0) / 4.0 - w * (w - 1.0) / 2.0
}

fn max_over_ranks(w: usize, i: usize) -> f64 {
    f(0, i).max(f(w - 1, i))
}

fn min_over_ranks(w: usize, i: usize) -> f64 {
    f(0, i).min(f(w - 1, i))
}

/// `[values]` of `kind`, shaped `shape`.
fn tensor(values: Vec<f64>, shape: &[i64], kind: Kind) -> Tensor {
    Tensor::from_slice(&values).to_kind(kind).reshape(shape)
}

fn rank_data(r: usize, n: usize, offset: usize, shape: &[i64], kind: Kind) -> Tensor {
    tensor((0..n).map(|i| f(r, i + offset)).collect(), shape, kind)
}

fn check_equal(what: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    ensure!(
        got.size() == want.size(),
        "{what}: shape {:?}, expected {:?}",
        got.size(),
        want.size()
    );
    ensure!(
        got.kind() == want.kind(),
        "{what}: kind {:?}, expected {:?}",
        got.kind(),
        want.kind()
    );
    if !got.equal(want) {
        bail!(
            "{what}: got {:?}, expected {:?}",
            Vec::<f64>::try_from(got.reshape([-1]))?,
            Vec::<f64>::try_from(want.reshape([-1]))?
        );
    }
    Ok(())
}

fn check_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    ensure!(
        got.size() == want.size(),
        "{what}: shape {:?}, expected {:?}",
        got.size(),
        want.size()
    );
    let err = f64::try_from((got - want).abs().max())?;
    ensure!(err <= tol, "{what}: max abs error {err} > {tol}");
    Ok(())
}

/// Every collective on this rank's data; `w == 1` is the world of one.
fn run_collectives(pg: &ProcessGroup) -> Result<()> {
    let (r, w) = (pg.rank(), pg.world_size());
    for kind in [Kind::Float, Kind::Double] {
        let k = format!("{kind:?}");
        let n = 7;

        // all_reduce: sum, max, min, avg.
        for (op, oracle) in [
            (ReduceOp::Sum, sum_over_ranks as fn(usize, usize) -> f64),
            (ReduceOp::Max, max_over_ranks),
            (ReduceOp::Min, min_over_ranks),
        ] {
            let mut t = rank_data(r, n, 0, &[n as i64], kind);
            pg.all_reduce(&mut t, op)?;
            let want = tensor((0..n).map(|i| oracle(w, i)).collect(), &[n as i64], kind);
            check_equal(&format!("all_reduce {op:?} {k}"), &t, &want)?;
        }
        let mut t = rank_data(r, n, 0, &[n as i64], kind);
        pg.all_reduce(&mut t, ReduceOp::Avg)?;
        let want = tensor(
            (0..n).map(|i| sum_over_ranks(w, i) / w as f64).collect(),
            &[n as i64],
            kind,
        );
        check_close(&format!("all_reduce Avg {k}"), &t, &want, 1e-6)?;

        // all_gather into a list and into one tensor ([2, 3] per rank -> [2W, 3]).
        let mine = rank_data(r, 6, 0, &[2, 3], kind);
        let list = pg.all_gather(&mine)?;
        ensure!(
            list.len() == w,
            "all_gather {k}: {} tensors for world size {w}",
            list.len()
        );
        for (q, got) in list.iter().enumerate() {
            check_equal(
                &format!("all_gather {k} block {q}"),
                got,
                &rank_data(q, 6, 0, &[2, 3], kind),
            )?;
        }
        let cat = pg.all_gather_cat(&mine)?;
        let want = Tensor::cat(
            &(0..w)
                .map(|q| rank_data(q, 6, 0, &[2, 3], kind))
                .collect::<Vec<_>>(),
            0,
        );
        check_equal(&format!("all_gather_cat {k}"), &cat, &want)?;

        // reduce_scatter: [W * 4] per rank; rank r gets the reduction of elements r*4 .. r*4+4.
        let m = 4;
        let input = rank_data(r, w * m, 0, &[(w * m) as i64], kind);
        let out = pg.reduce_scatter(&input, ReduceOp::Sum)?;
        let want = tensor(
            (0..m).map(|j| sum_over_ranks(w, r * m + j)).collect(),
            &[m as i64],
            kind,
        );
        check_equal(&format!("reduce_scatter Sum {k}"), &out, &want)?;
        let out = pg.reduce_scatter(&input, ReduceOp::Max)?;
        let want = tensor(
            (0..m).map(|j| max_over_ranks(w, r * m + j)).collect(),
            &[m as i64],
            kind,
        );
        check_equal(&format!("reduce_scatter Max {k}"), &out, &want)?;

        // broadcast from the last rank, then from rank 0.
        for root in [w - 1, 0] {
            let mut t = rank_data(r, n, 0, &[n as i64], kind);
            pg.broadcast(&mut t, root)?;
            check_equal(
                &format!("broadcast from {root} {k}"),
                &t,
                &rank_data(root, n, 0, &[n as i64], kind),
            )?;
        }

        // Bucketed all-reduce of a non-contiguous tensor and two others, 40-byte buckets.
        let a = rank_data(r, 12, 0, &[3, 4], kind).transpose(0, 1);
        let b = rank_data(r, 5, 12, &[5], kind);
        let c = rank_data(r, 8, 17, &[2, 2, 2], kind);
        let mut list = vec![a, b, c];
        pg.all_reduce_bucketed(&mut list, ReduceOp::Sum, 40)?;
        let want_a = tensor(
            (0..12).map(|i| sum_over_ranks(w, i)).collect(),
            &[3, 4],
            kind,
        )
        .transpose(0, 1);
        let want_b = tensor((12..17).map(|i| sum_over_ranks(w, i)).collect(), &[5], kind);
        let want_c = tensor(
            (17..25).map(|i| sum_over_ranks(w, i)).collect(),
            &[2, 2, 2],
            kind,
        );
        check_equal(&format!("all_reduce_bucketed a {k}"), &list[0], &want_a)?;
        check_equal(&format!("all_reduce_bucketed b {k}"), &list[1], &want_b)?;
        check_equal(&format!("all_reduce_bucketed c {k}"), &list[2], &want_c)?;
        // Again with the same layout (the bucket buffers are reused): max of fresh data.
        let mut list = vec![
            rank_data(r, 12, 0, &[3, 4], kind).transpose(0, 1),
            rank_data(r, 5, 12, &[5], kind),
        ];
        pg.all_reduce_bucketed(&mut list, ReduceOp::Max, 40)?;
        let want_a = tensor(
            (0..12).map(|i| max_over_ranks(w, i)).collect(),
            &[3, 4],
            kind,
        )
        .transpose(0, 1);
        check_equal(
            &format!("all_reduce_bucketed reused a {k}"),
            &list[0],
            &want_a,
        )?;
        let want_b = tensor((12..17).map(|i| max_over_ranks(w, i)).collect(), &[5], kind);
        check_equal(
            &format!("all_reduce_bucketed reused b {k}"),
            &list[1],
            &want_b,
        )?;
    }

    // Integers: sum works, avg is refused before any communication (the group stays usable).
    let mut t = Tensor::from_slice(&[1i64, 2, 3]) * (r as i64 + 1);
    pg.all_reduce(&mut t, ReduceOp::Sum)?;
    let s = (w * (w + 1) / 2) as i64;
    check_equal(
        "all_reduce Sum Int64",
        &t,
        &Tensor::from_slice(&[s, 2 * s, 3 * s]),
    )?;
    let e = pg
        .all_reduce(&mut t, ReduceOp::Avg)
        .unwrap_err()
        .to_string();
    ensure!(
        e.contains("floating-point"),
        "avg of Int64 should be refused, got {e}"
    );
    // A non-contiguous tensor cannot be reduced in place.
    let mut nc = Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu)).transpose(0, 1);
    let e = pg
        .all_reduce(&mut nc, ReduceOp::Sum)
        .unwrap_err()
        .to_string();
    ensure!(
        e.contains("contiguous"),
        "non-contiguous in-place reduce should be refused, got {e}"
    );
    Ok(())
}

/// One data-parallel run: parameters broadcast from rank 0 (every rank starts from its own
/// initialisation), each rank takes its `B / W` rows of every global batch of `B`, the gradients
/// are averaged with `all_reduce_bucketed`, clipped on the global norm and applied by SGD with
/// momentum. It must equal one process taking the whole batch (each rank recomputes that
/// reference locally), with and without clipping. f64 least squares, 24 rows, global batch 12,
/// 6 steps.
fn data_parallel_step_matches_one_process(pg: &ProcessGroup) -> Result<()> {
    let (r, w) = (pg.rank(), pg.world_size());
    let opts = (Kind::Double, tch::Device::Cpu);
    let x = (Tensor::arange(24 * 5, opts).reshape([24, 5]) * 0.37).sin();
    let y = (Tensor::arange(24 * 3, opts).reshape([24, 3]) * 0.11).cos();
    let init = |seed: usize| {
        let s = seed as f64 + 1.0;
        (
            (Tensor::arange(15, opts).reshape([5, 3]) * 0.3 * s).cos() * 0.5,
            Tensor::full([3], 0.1 * s, opts),
        )
    };
    let (global_batch, steps, lr, momentum) = (12i64, 6, 0.1, 0.9);
    let local = global_batch / w as i64;
    // run(params, rows of step s) with the gradient combined by `combine`.
    let train = |mut params: Vec<Tensor>,
                 max_norm: f64,
                 rows: &dyn Fn(i64) -> (i64, i64),
                 combine: &dyn Fn(&mut [Tensor]) -> Result<()>|
     -> Result<(Vec<Tensor>, usize)> {
        let mut clipped = 0;
        let mut velocity: Vec<Tensor> = params.iter().map(|p| p.zeros_like()).collect();
        for p in params.iter_mut() {
            *p = p.set_requires_grad(true);
        }
        for step in 0..steps {
            let (start, len) = rows(step);
            let (xb, yb) = (x.narrow(0, start, len), y.narrow(0, start, len));
            let loss = (xb.matmul(&params[0]) + &params[1] - yb)
                .square()
                .mean(Kind::Double);
            for p in params.iter_mut() {
                p.zero_grad();
            }
            loss.backward();
            let mut grads: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
            combine(&mut grads)?;
            let _guard = tch::no_grad_guard();
            let norm = f64::try_from(
                grads
                    .iter()
                    .map(|g| g.square().sum(Kind::Double))
                    .fold(Tensor::zeros([], opts), |a, b| a + b)
                    .sqrt(),
            )?;
            let scale = if norm > max_norm {
                clipped += 1;
                max_norm / norm
            } else {
                1.0
            };
            for ((p, v), g) in params.iter_mut().zip(velocity.iter_mut()).zip(&grads) {
                *v = &*v * momentum + g * scale;
                let _ = p.f_sub_(&(&*v * lr))?;
            }
        }
        Ok((params.into_iter().map(|p| p.detach()).collect(), clipped))
    };
    // Without clipping (a sum instead of the average would show) and with it (the clip must see
    // the global gradient).
    for max_norm in [f64::INFINITY, 0.5] {
        // Data parallel: start from this rank's own init, take rank 0's by broadcast.
        let (mut w0, mut b0) = init(r);
        pg.broadcast(&mut w0, 0)?;
        pg.broadcast(&mut b0, 0)?;
        let start_of = |step: i64| (step * global_batch) % 24;
        let (parallel, clipped) = train(
            vec![w0, b0],
            max_norm,
            &|s| (start_of(s) + r as i64 * local, local),
            &|g| pg.all_reduce_bucketed(g, ReduceOp::Avg, 64),
        )?;
        let (w_ref, b_ref) = init(0);
        let (reference, _) = train(
            vec![w_ref, b_ref],
            max_norm,
            &|s| (start_of(s), global_batch),
            &|_| Ok(()),
        )?;
        for (name, (a, b)) in ["weight", "bias"]
            .iter()
            .zip(parallel.iter().zip(&reference))
        {
            check_close(
                &format!("data-parallel {name} vs one process, clip {max_norm}"),
                a,
                b,
                1e-12,
            )?;
        }
        ensure!(!parallel[0].equal(&init(0).0), "the weights did not move");
        ensure!(
            (clipped > 0) == max_norm.is_finite(),
            "clip {max_norm}: {clipped} of {steps} steps clipped"
        );
    }
    Ok(())
}

/// Barrier: every rank creates its file, rank 0 only after a pause; after the barrier every
/// rank must see all W files (a barrier that did not wait would let ranks 1.. miss rank 0's).
fn run_barrier(pg: &ProcessGroup) -> Result<()> {
    let dir = common::shared_dir();
    if pg.rank() == 0 {
        std::thread::sleep(Duration::from_millis(300));
    }
    std::fs::write(dir.join(format!("barrier-{}", pg.rank())), b"")?;
    pg.barrier()?;
    for q in 0..pg.world_size() {
        ensure!(
            dir.join(format!("barrier-{q}")).exists(),
            "after the barrier, rank {q}'s file is missing"
        );
    }
    Ok(())
}

fn worker() -> Result<()> {
    let rv = Rendezvous::from_env()?;
    let pg = ProcessGroup::new(&rv, Backend::Gloo)?;
    ensure!(
        pg.rank() == rv.rank && pg.world_size() == rv.world_size,
        "rank/world size not kept"
    );
    run_collectives(&pg)?;
    data_parallel_step_matches_one_process(&pg)?;
    run_barrier(&pg)
}

fn spawn(world: usize) {
    let ranks = common::Ranks::spawn("collectives", world, common::free_port(), |_| {
        vec![("FACEREC_DIST_TIMEOUT".into(), "30".into())]
    });
    ranks.expect_success(Duration::from_secs(60));
}

fn collectives_2_ranks() {
    spawn(2);
}

fn collectives_3_ranks() {
    spawn(3);
}

/// A world of one through the same API: every collective is the identity.
fn single_process_world() {
    let pg = ProcessGroup::single().expect("world of one");
    assert_eq!((pg.rank(), pg.world_size()), (0, 1));
    run_collectives(&pg).expect("collectives on a world of one");
    data_parallel_step_matches_one_process(&pg).expect("data parallel on a world of one");
}

/// Gloo's code must come from libtorch_cpu.so: a second copy (Debian's libgloo) would clash.
fn no_system_gloo_loaded() {
    let _pg = ProcessGroup::single().expect("world of one");
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    assert!(
        maps.contains("libtorch_cpu.so"),
        "libtorch_cpu.so is not mapped"
    );
    let gloo: Vec<&str> = maps.lines().filter(|l| l.contains("libgloo")).collect();
    assert!(
        gloo.is_empty(),
        "a separate Gloo library is loaded: {gloo:?}"
    );
}

fn main() {
    common::main(
        &[
            ("no_system_gloo_loaded", no_system_gloo_loaded),
            ("single_process_world", single_process_world),
            ("collectives_2_ranks", collectives_2_ranks),
            ("collectives_3_ranks", collectives_3_ranks),
        ],
        &[("collectives", worker)],
    );
}
