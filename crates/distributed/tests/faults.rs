//! Failures end in errors, never in hangs or aborts: a killed rank, a stuck rank, ranks given
//! different ports (so one finds no store), ranks that disagree on the world size, bad arguments.
//!
//! Every multi-process case runs its ranks as child processes of this binary (see
//! `tests/common`), on 127.0.0.1 with ports chosen free at run time, and kills them on exit.
//! The time bounds asserted here are the configured timeouts (plus process start-up), i.e. the
//! API's promise not to block longer than `Rendezvous::timeout`; they are not speed measurements.
//! Run: `cargo xtask test -p facerec-distributed --test faults`.

mod common;

use anyhow::Result;
use facerec_distributed::{Backend, ProcessGroup, ReduceOp, Rendezvous};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Slack for starting a process that loads libtorch on a busy 2-core machine.
const STARTUP: Duration = Duration::from_secs(20);

fn join() -> Result<ProcessGroup> {
    ProcessGroup::new(&Rendezvous::from_env()?, Backend::Gloo)
}

/// All ranks join and reduce once, then signal "ready". The last rank then waits to be killed;
/// the others keep all-reducing until that fails, print the error and exit non-zero.
fn worker_until_peer_dies() -> Result<()> {
    let pg = join()?;
    let mut t = Tensor::ones([1024], (Kind::Float, tch::Device::Cpu));
    pg.all_reduce(&mut t, ReduceOp::Sum)?;
    std::fs::write(
        common::shared_dir().join(format!("ready-{}", pg.rank())),
        b"",
    )?;
    if pg.rank() == pg.world_size() - 1 {
        std::thread::sleep(Duration::from_secs(120));
        return Ok(());
    }
    loop {
        pg.all_reduce(&mut t, ReduceOp::Sum)?;
    }
}

/// Rank 1 joins and then never takes part in a collective; rank 0's all-reduce must time out.
fn worker_stuck_peer() -> Result<()> {
    let pg = join()?;
    if pg.rank() == 1 {
        std::thread::sleep(Duration::from_secs(120));
        return Ok(());
    }
    let mut t = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
    let start = Instant::now();
    let res = pg.all_reduce(&mut t, ReduceOp::Sum);
    std::fs::write(
        common::shared_dir().join("elapsed"),
        format!("{}", start.elapsed().as_secs_f64()),
    )?;
    res
}

/// Only join (used for rendezvous failures).
fn worker_join() -> Result<()> {
    join().map(|_| ())
}

fn one_rank_killed_is_named() {
    let world = 3;
    let mut ranks = common::Ranks::spawn("until_peer_dies", world, common::free_port(), |_| {
        vec![("FACEREC_DIST_TIMEOUT".into(), "10".into())]
    });
    for r in 0..world {
        let path = ranks.dir().join(format!("ready-{r}"));
        ranks.wait_for_file(&path, STARTUP + Duration::from_secs(10));
    }
    ranks.kill(world - 1);
    ranks.mark();
    let exits = ranks.wait(&[0, 1], Duration::from_secs(10) + Duration::from_secs(5));
    for e in &exits {
        assert_eq!(
            e.status.code(),
            Some(common::WORKER_FAILED),
            "rank {} should fail cleanly: {}\n{}",
            e.rank,
            e.status,
            e.stderr
        );
        assert!(
            e.stderr.contains("all_reduce failed on rank"),
            "rank {}: {}",
            e.rank,
            e.stderr
        );
        assert!(
            e.stderr.contains(&format!("rank {}", world - 1)) && e.stderr.contains("exited"),
            "rank {} does not name the dead rank: {}",
            e.rank,
            e.stderr
        );
        assert!(
            e.after < Duration::from_secs(10),
            "rank {} took {:?}, more than the 10 s timeout",
            e.rank,
            e.after
        );
        println!(
            "  rank {} exited {:.2} s after the kill: {}",
            e.rank,
            e.after.as_secs_f64(),
            e.stderr.trim()
        );
    }
}

fn stuck_peer_times_out() {
    let timeout = 2.0;
    let mut ranks = common::Ranks::spawn("stuck_peer", 2, common::free_port(), |_| {
        vec![("FACEREC_DIST_TIMEOUT".into(), timeout.to_string())]
    });
    let exits = ranks.wait(&[0], STARTUP + Duration::from_secs(10));
    let e = &exits[0];
    assert_eq!(
        e.status.code(),
        Some(common::WORKER_FAILED),
        "rank 0 should fail cleanly: {}\n{}",
        e.status,
        e.stderr
    );
    let elapsed: f64 = std::fs::read_to_string(ranks.dir().join("elapsed"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        elapsed >= timeout * 0.9 && elapsed < timeout + 3.0,
        "all_reduce returned after {elapsed} s with a {timeout} s timeout"
    );
    assert!(
        e.stderr.contains("all_reduce failed on rank 0 of 2"),
        "{}",
        e.stderr
    );
    assert!(
        e.stderr.to_lowercase().contains("timed out")
            || e.stderr.to_lowercase().contains("timeout"),
        "{}",
        e.stderr
    );
    assert!(e.stderr.contains("still running"), "{}", e.stderr);
    println!(
        "  all_reduce failed after {elapsed:.2} s: {}",
        e.stderr.trim()
    );
}

/// Rank 0 hosts the store on one port, rank 1 looks on another where nobody listens (the
/// unreachable-store case): both fail within the timeout, rank 1 naming the address it tried.
fn wrong_port() {
    let (good, bad) = (common::free_port(), common::free_port());
    let mut ranks = common::Ranks::spawn("join", 2, good, |rank| {
        let mut env = vec![("FACEREC_DIST_TIMEOUT".into(), "2".into())];
        if rank == 1 {
            env.push(("MASTER_PORT".into(), bad.to_string()));
        }
        env
    });
    let exits = ranks.wait(&[0, 1], STARTUP + Duration::from_secs(10));
    for e in &exits {
        assert_eq!(
            e.status.code(),
            Some(common::WORKER_FAILED),
            "rank {}: {}\n{}",
            e.rank,
            e.status,
            e.stderr
        );
        assert!(
            e.stderr.contains(&format!("rank {} of 2", e.rank)),
            "{}",
            e.stderr
        );
        println!(
            "  rank {} after {:.2} s: {}",
            e.rank,
            e.after.as_secs_f64(),
            e.stderr.trim()
        );
    }
    assert!(
        exits[1].stderr.contains(&format!("127.0.0.1:{bad}")),
        "{}",
        exits[1].stderr
    );
}

/// Rank 1 believes the world has 3 ranks, rank 0 that it has 2: no group forms, both fail within
/// the timeout instead of waiting for a rank that never comes.
fn mismatched_world_size() {
    let mut ranks = common::Ranks::spawn("join", 2, common::free_port(), |rank| {
        let mut env = vec![("FACEREC_DIST_TIMEOUT".into(), "2".into())];
        if rank == 1 {
            env.push(("WORLD_SIZE".into(), "3".into()));
        }
        env
    });
    let exits = ranks.wait(&[0, 1], STARTUP + Duration::from_secs(10));
    for e in &exits {
        assert_eq!(
            e.status.code(),
            Some(common::WORKER_FAILED),
            "rank {}: {}\n{}",
            e.rank,
            e.status,
            e.stderr
        );
        println!(
            "  rank {} after {:.2} s: {}",
            e.rank,
            e.after.as_secs_f64(),
            e.stderr.lines().last().unwrap_or("")
        );
    }
    assert!(
        exits[1].stderr.contains("rank 1 of 3"),
        "{}",
        exits[1].stderr
    );
}

/// Arguments that cannot work are refused before any connection is attempted.
fn bad_arguments() {
    let e = ProcessGroup::new(&Rendezvous::new("127.0.0.1", 1234, 2, 2), Backend::Gloo)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 2 is out of range for world size 2"), "{e}");
    let e = ProcessGroup::new(&Rendezvous::new("127.0.0.1", 1234, 0, 0), Backend::Gloo)
        .unwrap_err()
        .to_string();
    assert!(e.contains("world size must be at least 1"), "{e}");
    let e = ProcessGroup::new(&Rendezvous::new("127.0.0.1", 0, 0, 2), Backend::Gloo)
        .unwrap_err()
        .to_string();
    assert!(e.contains("port 0"), "{e}");
    if !facerec_distributed::NCCL_COMPILED {
        let e = format!(
            "{:#}",
            ProcessGroup::new(&Rendezvous::single(), Backend::Nccl).unwrap_err()
        );
        assert!(e.contains("without the `nccl` feature"), "{e}");
    } else if !tch::Cuda::is_available() {
        // NCCL compiled in, but no GPU: an error, not an abort.
        let e = format!(
            "{:#}",
            ProcessGroup::new(&Rendezvous::single(), Backend::Nccl).unwrap_err()
        );
        assert!(e.contains("joining the nccl process group"), "{e}");
        println!("  nccl without a GPU: {e}");
    }
    let pg = ProcessGroup::single().unwrap();
    let mut t = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    let e = pg.broadcast(&mut t, 1).unwrap_err().to_string();
    assert!(e.contains("root rank 1 is out of range"), "{e}");
    let e = pg
        .reduce_scatter(
            &Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
            ReduceOp::Sum,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of the world size"), "{e}");
}

fn main() {
    common::main(
        &[
            ("bad_arguments", bad_arguments),
            ("one_rank_killed_is_named", one_rank_killed_is_named),
            ("stuck_peer_times_out", stuck_peer_times_out),
            ("wrong_port", wrong_port),
            ("mismatched_world_size", mismatched_world_size),
        ],
        &[
            ("until_peer_dies", worker_until_peer_dies),
            ("stuck_peer", worker_stuck_peer),
            ("join", worker_join),
        ],
    );
}
