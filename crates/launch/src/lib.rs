//! Start and supervise the local processes of a distributed job, like `torchrun --nproc-per-node`.
//!
//! [`launch`] starts `nproc_per_node` copies of a program with torchrun's variables set (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`) and
//! waits for them. If one exits with a failure or is killed by a signal, the others are sent
//! SIGTERM, then SIGKILL after a grace period, and the error names the rank that failed first and
//! its exit status. A child also receives SIGTERM if the launcher itself dies (Linux
//! `PR_SET_PDEATHSIG`), so no rank is left behind.
//!
//! [`split_launch_args`] takes the launcher's flags (`--nproc`, `--nnodes`, `--node-rank`,
//! `--master-addr`, `--master-port`) out of a command line, so that `cargo xtask train --nproc 2
//! --config x.toml` and, if wanted, the `facerec` binary itself can share one parser.
//!
//! This crate depends on neither libtorch nor tch: `cargo xtask` uses it before libtorch exists.
//! The processes find each other through `facerec_distributed::Rendezvous::from_env`.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Where the processes of a job run and meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Processes on this machine (`--nproc`).
    pub nproc_per_node: usize,
    /// Machines in the job (`--nnodes`, default 1).
    pub nnodes: usize,
    /// This machine's index in `0..nnodes` (`--node-rank`, default 0); its processes get the ranks
    /// `node_rank * nproc_per_node ..`.
    pub node_rank: usize,
    /// Host of global rank 0 (`--master-addr`, default 127.0.0.1; required when `nnodes > 1`).
    pub master_addr: String,
    /// Port of the store on `master_addr` (`--master-port`). `None`: a port free on this machine
    /// at launch time (only for `nnodes == 1`).
    pub master_port: Option<u16>,
    /// How long stopped ranks get between SIGTERM and SIGKILL.
    pub grace: Duration,
}

impl LaunchConfig {
    /// `nproc` processes on this machine alone.
    pub fn local(nproc: usize) -> Self {
        Self {
            nproc_per_node: nproc,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: None,
            grace: Duration::from_secs(5),
        }
    }

    /// Total number of processes.
    pub fn world_size(&self) -> usize {
        self.nproc_per_node * self.nnodes
    }

    /// Check the fields against each other.
    pub fn validate(&self) -> Result<()> {
        if self.nproc_per_node == 0 {
            bail!("--nproc must be at least 1");
        }
        if self.nnodes == 0 {
            bail!("--nnodes must be at least 1");
        }
        if self.node_rank >= self.nnodes {
            bail!(
                "--node-rank {} is out of range for --nnodes {} (0..{})",
                self.node_rank,
                self.nnodes,
                self.nnodes
            );
        }
        if self.nnodes > 1 {
            if self.master_port.is_none() {
                bail!(
                    "--nnodes {} needs --master-port (every machine must use the same port)",
                    self.nnodes
                );
            }
            if is_loopback(&self.master_addr) {
                bail!(
                    "--nnodes {} needs --master-addr: the address of node 0 as the other machines reach it (not {})",
                    self.nnodes,
                    self.master_addr
                );
            }
        }
        if self.master_port == Some(0) {
            bail!("--master-port 0 is not a port to connect to");
        }
        Ok(())
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.starts_with("127.") || host == "::1"
}

/// Take the launcher flags out of `args` (`--flag value` or `--flag=value`, anywhere).
/// Returns `None` when neither `--nproc` (alias `--nproc-per-node`) nor `--nnodes` is given, and
/// the remaining arguments in their order.
pub fn split_launch_args(args: &[String]) -> Result<(Option<LaunchConfig>, Vec<String>)> {
    let mut cfg = LaunchConfig::local(1);
    let mut seen = false;
    let mut addr_given = false;
    let mut rest = vec![];
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let known = matches!(
            flag.as_str(),
            "--nproc"
                | "--nproc-per-node"
                | "--nproc_per_node"
                | "--nnodes"
                | "--node-rank"
                | "--node_rank"
                | "--master-addr"
                | "--master_addr"
                | "--master-port"
                | "--master_port"
        );
        if arg == "--" {
            rest.extend(args[i..].iter().cloned());
            break;
        }
        if !known {
            rest.push(arg.clone());
            i += 1;
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .with_context(|| format!("{flag} needs a value"))?
            }
        };
        let number = |v: &str| -> Result<usize> {
            v.parse()
                .with_context(|| format!("{flag} {v:?} is not a number"))
        };
        match flag.replace('_', "-").as_str() {
            "--nproc" | "--nproc-per-node" => {
                cfg.nproc_per_node = number(&value)?;
                seen = true;
            }
            "--nnodes" => {
                cfg.nnodes = number(&value)?;
                seen = true;
            }
            "--node-rank" => cfg.node_rank = number(&value)?,
            "--master-addr" => {
                cfg.master_addr = value;
                addr_given = true;
            }
            "--master-port" => {
                cfg.master_port = Some(
                    value
                        .parse()
                        .with_context(|| format!("{flag} {value:?} is not a port (0..65535)"))?,
                )
            }
            _ => unreachable!(),
        }
        i += 1;
    }
    if !seen {
        if addr_given || cfg.master_port.is_some() || cfg.node_rank != 0 {
            bail!("--node-rank, --master-addr and --master-port only make sense with --nproc N (and --nnodes M)");
        }
        return Ok((None, rest));
    }
    cfg.validate()?;
    Ok((Some(cfg), rest))
}

/// A port on this machine that was free a moment ago (bound to port 0, read, released).
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("0.0.0.0:0").context("looking for a free port (binding 0.0.0.0:0)")?;
    Ok(listener.local_addr()?.port())
}

/// How one rank ended.
#[derive(Debug, Clone)]
pub struct RankExit {
    /// Global rank.
    pub rank: usize,
    /// Rank on this machine.
    pub local_rank: usize,
    /// Its exit status.
    pub status: ExitStatus,
}

/// `exit code 1`, `killed by signal 9 (SIGKILL)`.
pub fn describe_status(status: &ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    match status.signal() {
        Some(sig) => format!("killed by signal {sig} ({})", signal_name(sig)),
        None => status.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGINT => "SIGINT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

/// Start this machine's ranks of `program args` and supervise them (see the crate docs).
/// `env` is added to every child's environment. Returns every rank's exit when all succeeded;
/// otherwise an error naming the first rank that failed and its status, after the others were
/// stopped.
pub fn launch(
    cfg: &LaunchConfig,
    program: &Path,
    args: &[OsString],
    env: &[(String, OsString)],
) -> Result<Vec<RankExit>> {
    cfg.validate()?;
    let port = match cfg.master_port {
        Some(p) => p,
        None => free_port()?,
    };
    let world = cfg.world_size();
    let threads = std::env::var_os("OMP_NUM_THREADS").is_none().then(|| {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / cfg.nproc_per_node).max(1)
    });
    eprintln!(
        "launch: {} process(es) on this node (node {} of {}), world size {world}, store at {}:{port}{}",
        cfg.nproc_per_node,
        cfg.node_rank,
        cfg.nnodes,
        cfg.master_addr,
        threads.map(|t| format!(", OMP_NUM_THREADS={t}")).unwrap_or_default()
    );
    let mut children: Vec<(usize, usize, Child)> = vec![];
    for local in 0..cfg.nproc_per_node {
        let rank = cfg.node_rank * cfg.nproc_per_node + local;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", cfg.nproc_per_node.to_string())
            .env("GROUP_RANK", cfg.node_rank.to_string())
            .env("MASTER_ADDR", &cfg.master_addr)
            .env("MASTER_PORT", port.to_string());
        if let Some(t) = threads {
            cmd.env("OMP_NUM_THREADS", t.to_string());
        }
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to send SIGTERM to the child
        // when this (the spawning) thread exits.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => children.push((rank, local, child)),
            Err(e) => {
                stop(&mut children, cfg.grace);
                return Err(e)
                    .with_context(|| format!("starting rank {rank}: {}", program.display()));
            }
        }
    }
    supervise(children, cfg.grace)
}

fn supervise(mut running: Vec<(usize, usize, Child)>, grace: Duration) -> Result<Vec<RankExit>> {
    let mut done: Vec<RankExit> = vec![];
    loop {
        let mut i = 0;
        let mut failed: Option<RankExit> = None;
        while i < running.len() {
            let (rank, local, child) = &mut running[i];
            match child.try_wait() {
                Ok(Some(status)) => {
                    let exit = RankExit {
                        rank: *rank,
                        local_rank: *local,
                        status,
                    };
                    running.remove(i);
                    if !status.success() && failed.is_none() {
                        failed = Some(exit.clone());
                    }
                    done.push(exit);
                }
                Ok(None) => i += 1,
                Err(e) => {
                    let rank = *rank;
                    stop(&mut running, grace);
                    return Err(e).with_context(|| format!("waiting for rank {rank}"));
                }
            }
        }
        if let Some(first) = failed {
            let others: Vec<usize> = running.iter().map(|(r, _, _)| *r).collect();
            stop(&mut running, grace);
            let stopped = if others.is_empty() {
                String::new()
            } else {
                format!("; stopped ranks {others:?}")
            };
            bail!(
                "rank {} (local rank {}) failed: {}{stopped}",
                first.rank,
                first.local_rank,
                describe_status(&first.status)
            );
        }
        if running.is_empty() {
            done.sort_by_key(|e| e.rank);
            return Ok(done);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM every child, SIGKILL those still running after `grace`, reap all.
fn stop(children: &mut Vec<(usize, usize, Child)>, grace: Duration) {
    for (_, _, child) in children.iter() {
        // SAFETY: plain kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|(_, _, c)| matches!(c.try_wait(), Ok(None)))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (_, _, child) in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn flags_are_taken_out_and_the_rest_kept_in_order() {
        let (cfg, rest) = split_launch_args(&s(&[
            "--config",
            "x.toml",
            "--nproc",
            "2",
            "--set=a.b=1",
            "--master-port=29501",
        ]))
        .unwrap();
        let cfg = cfg.unwrap();
        assert_eq!(cfg.nproc_per_node, 2);
        assert_eq!(cfg.master_port, Some(29501));
        assert_eq!(rest, s(&["--config", "x.toml", "--set=a.b=1"]));
        let (cfg, rest) = split_launch_args(&s(&["--config", "x.toml"])).unwrap();
        assert!(cfg.is_none());
        assert_eq!(rest, s(&["--config", "x.toml"]));
    }

    #[test]
    fn multi_node_needs_address_and_port() {
        let (cfg, _) = split_launch_args(&s(&[
            "--nproc",
            "4",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "10.0.0.1",
            "--master-port",
            "29500",
        ]))
        .unwrap();
        let cfg = cfg.unwrap();
        assert_eq!((cfg.world_size(), cfg.node_rank), (8, 1));
        let e = split_launch_args(&s(&[
            "--nproc",
            "4",
            "--nnodes",
            "2",
            "--master-addr",
            "10.0.0.1",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("--master-port"), "{e}");
        let e = split_launch_args(&s(&["--nproc", "4", "--nnodes", "2", "--master-port", "1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--master-addr"), "{e}");
        let e = split_launch_args(&s(&[
            "--nproc",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "2",
            "--master-addr",
            "h",
            "--master-port",
            "1",
        ]))
        .unwrap_err()
        .to_string();
        assert!(e.contains("--node-rank 2 is out of range"), "{e}");
        let e = split_launch_args(&s(&["--master-port", "1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only make sense with --nproc"), "{e}");
        let e = split_launch_args(&s(&["--nproc", "x"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--nproc \"x\" is not a number"), "{e}");
        let e = split_launch_args(&s(&["--nproc"])).unwrap_err().to_string();
        assert!(e.contains("needs a value"), "{e}");
    }
}
