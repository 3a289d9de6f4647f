//! Where and how the processes of one job meet: the TCPStore address hosted by rank 0, this
//! process's rank, the world size and the timeout, read from code or from the environment that
//! `torchrun`, `cargo xtask train --nproc` and Slurm set.

use anyhow::{bail, Context, Result};
use std::time::Duration;

/// The torchrun variables, in the order they are read.
pub const ENV_RANK: &str = "RANK";
/// Number of processes in the job.
pub const ENV_WORLD_SIZE: &str = "WORLD_SIZE";
/// Rank of the process on its machine (selects `cuda:LOCAL_RANK`).
pub const ENV_LOCAL_RANK: &str = "LOCAL_RANK";
/// Host of rank 0, where the TCPStore listens.
pub const ENV_MASTER_ADDR: &str = "MASTER_ADDR";
/// Port of the TCPStore on `MASTER_ADDR`.
pub const ENV_MASTER_PORT: &str = "MASTER_PORT";
/// facerec's own: the rendezvous and collective timeout in seconds (default 300).
pub const ENV_TIMEOUT: &str = "FACEREC_DIST_TIMEOUT";

/// Default for [`Rendezvous::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Everything a process needs to join its group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// Host name or address of rank 0, which hosts the TCPStore.
    pub master_addr: String,
    /// TCP port of the store (ignored for a world of one).
    pub master_port: u16,
    /// This process's rank in `0..world_size`.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this machine; on CUDA the process uses `cuda:local_rank`.
    pub local_rank: usize,
    /// Bound on the rendezvous (connecting to the store, meeting every peer) and on every
    /// collective. A dead or stuck peer surfaces as an error after at most this long.
    pub timeout: Duration,
    /// Address this rank's Gloo transport binds to. `None`: 127.0.0.1 when `master_addr` is a
    /// loopback address, else libtorch's choice (`GLOO_SOCKET_IFNAME` if set, else the address
    /// this machine's hostname resolves to).
    pub bind_addr: Option<String>,
}

impl Rendezvous {
    /// A world of one process: no store, no network. Every collective is then the identity
    /// (all-reduce leaves the tensor as is, all-gather returns one copy, ...).
    pub fn single() -> Self {
        Self::new("127.0.0.1", 0, 0, 1)
    }

    /// A rendezvous at `master_addr:master_port` for `rank` of `world_size`, with
    /// `local_rank = rank` (one machine) and the default timeout.
    pub fn new(master_addr: &str, master_port: u16, rank: usize, world_size: usize) -> Self {
        Self {
            master_addr: master_addr.to_string(),
            master_port,
            rank,
            world_size,
            local_rank: rank,
            timeout: DEFAULT_TIMEOUT,
            bind_addr: None,
        }
    }

    /// The same with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Check the fields against each other.
    pub fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            bail!("world size must be at least 1");
        }
        if self.rank >= self.world_size {
            bail!(
                "rank {} is out of range for world size {} (ranks are 0..{})",
                self.rank,
                self.world_size,
                self.world_size
            );
        }
        if self.world_size > i32::MAX as usize {
            bail!("world size {} is too large", self.world_size);
        }
        if self.world_size > 1 {
            if self.master_addr.trim().is_empty() {
                bail!(
                    "the master address is empty (world size {})",
                    self.world_size
                );
            }
            if self.master_port == 0 {
                bail!(
                    "master port 0 is not a port to connect to (world size {})",
                    self.world_size
                );
            }
        }
        if self.timeout.is_zero() {
            bail!("the timeout must be positive");
        }
        Ok(())
    }

    /// Read the process's place in the job from the environment.
    ///
    /// - torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), as
    ///   set by `torchrun`, `cargo xtask train --nproc N` or a job script;
    /// - else Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) for `srun` launching one task
    ///   per rank, with `MASTER_ADDR`/`MASTER_PORT` still required from the job script;
    /// - else a world of one ([`Rendezvous::single`]).
    ///
    /// `FACEREC_DIST_TIMEOUT` (seconds) overrides the timeout. Every error names the variable.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Rendezvous::from_env`] over any variable lookup (tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let timeout = match get(ENV_TIMEOUT) {
            Some(v) => {
                let secs: f64 = parse(ENV_TIMEOUT, &v)?;
                if !(secs > 0.0 && secs.is_finite()) {
                    bail!("{ENV_TIMEOUT}={v:?} must be a positive number of seconds");
                }
                Duration::from_secs_f64(secs)
            }
            None => DEFAULT_TIMEOUT,
        };
        let (rank_var, world_var, local_var) =
            if get(ENV_RANK).is_some() || get(ENV_WORLD_SIZE).is_some() {
                (ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK)
            } else if get("SLURM_PROCID").is_some() {
                ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
            } else {
                return Ok(Self::single().with_timeout(timeout));
            };
        let require = |name: &str, other: &str| {
            get(name).with_context(|| {
                format!("{other} is set but {name} is not (both are needed to join a group)")
            })
        };
        let rank: usize = parse(rank_var, &require(rank_var, world_var)?)?;
        let world_size: usize = parse(world_var, &require(world_var, rank_var)?)?;
        let local_rank: usize = match get(local_var) {
            Some(v) => parse(local_var, &v)?,
            None => rank,
        };
        let (master_addr, master_port) = if world_size > 1 {
            let hint = if rank_var == ENV_RANK {
                String::new()
            } else {
                " (under Slurm, e.g. `export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)` and `export MASTER_PORT=29500` in the job script)".to_string()
            };
            let addr = get(ENV_MASTER_ADDR)
                .with_context(|| format!("{world_var}={world_size} but {ENV_MASTER_ADDR} (the host of rank 0) is not set{hint}"))?;
            let port_text = get(ENV_MASTER_PORT)
                .with_context(|| format!("{world_var}={world_size} but {ENV_MASTER_PORT} (the store's port on {addr}) is not set{hint}"))?;
            let port: u16 = parse(ENV_MASTER_PORT, &port_text)?;
            (addr.trim().to_string(), port)
        } else {
            let port = match get(ENV_MASTER_PORT) {
                Some(v) => parse(ENV_MASTER_PORT, &v)?,
                None => 0,
            };
            (
                get(ENV_MASTER_ADDR).unwrap_or_else(|| "127.0.0.1".into()),
                port,
            )
        };
        let rv = Self {
            master_addr,
            master_port,
            rank,
            world_size,
            local_rank,
            timeout,
            bind_addr: None,
        };
        rv.validate().with_context(|| format!("from the environment ({rank_var}, {world_var}, {ENV_MASTER_ADDR}, {ENV_MASTER_PORT})"))?;
        Ok(rv)
    }
}

fn parse<T: std::str::FromStr>(name: &str, value: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{name}={value:?} is not valid: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Rendezvous> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Rendezvous::from_vars(|k| map.get(k).cloned())
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        format!("{:#}", from(pairs).unwrap_err())
    }

    #[test]
    fn empty_environment_is_a_world_of_one() {
        let rv = from(&[]).unwrap();
        assert_eq!((rv.rank, rv.world_size, rv.local_rank), (0, 1, 0));
        assert_eq!(rv.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn torchrun_variables_are_read() {
        let rv = from(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("FACEREC_DIST_TIMEOUT", "2.5"),
        ])
        .unwrap();
        assert_eq!(rv.master_addr, "node0");
        assert_eq!(rv.master_port, 29500);
        assert_eq!((rv.rank, rv.world_size, rv.local_rank), (5, 8, 1));
        assert_eq!(rv.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn local_rank_defaults_to_rank() {
        let rv = from(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!(rv.local_rank, 1);
    }

    #[test]
    fn slurm_variables_are_the_fallback() {
        let rv = from(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "n1"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!((rv.rank, rv.world_size, rv.local_rank), (3, 4, 1));
        let e = err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]);
        assert!(e.contains("MASTER_ADDR") && e.contains("scontrol"), "{e}");
    }

    #[test]
    fn errors_name_the_variable() {
        assert!(
            err(&[("RANK", "0")]).contains("WORLD_SIZE"),
            "{}",
            err(&[("RANK", "0")])
        );
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK"));
        let e = err(&[("RANK", "x"), ("WORLD_SIZE", "2")]);
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")]);
        assert!(e.contains("MASTER_PORT"), "{e}");
        let e = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]);
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "70000"),
        ]);
        assert!(e.contains("MASTER_PORT=\"70000\""), "{e}");
        let e = err(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
        ]);
        assert!(e.contains("rank 2 is out of range for world size 2"), "{e}");
        let e = err(&[("FACEREC_DIST_TIMEOUT", "-1")]);
        assert!(e.contains("FACEREC_DIST_TIMEOUT"), "{e}");
    }
}
