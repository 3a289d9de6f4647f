//! Naming the peer that failed.
//!
//! Gloo reports a dead peer as a socket error with an address ("Connection reset by peer",
//! "Connection closed by peer [127.0.0.1]:NNNN"), not as a rank. At rendezvous every rank
//! therefore publishes where it runs (host name, PID namespace, PID) in the store; when a
//! collective fails, the ranks that ran on this machine are checked in `/proc`, and the ones that
//! have exited (or are zombies) are named in the error.

use crate::ProcessGroup;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// Where one rank runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub rank: usize,
    /// Host name and PID namespace: two ranks with equal `machine` see the same `/proc`.
    pub machine: String,
    pub pid: u32,
}

fn this_machine() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{host} {ns}")
}

const KEY: &str = "facerec/peer";

/// Publish this rank's identity and read every other rank's (bounded by the group's timeout).
pub fn exchange(pg: &ProcessGroup) -> Result<Vec<Peer>> {
    let me = Peer {
        rank: pg.rank(),
        machine: this_machine(),
        pid: std::process::id(),
    };
    pg.store_set(
        &format!("{KEY}/{}", me.rank),
        format!("{}\n{}", me.pid, me.machine).as_bytes(),
    )?;
    let mut peers = Vec::with_capacity(pg.world_size());
    for rank in 0..pg.world_size() {
        if rank == me.rank {
            peers.push(me.clone());
            continue;
        }
        let bytes = pg.store_get(&format!("{KEY}/{rank}"))?;
        let text = String::from_utf8_lossy(&bytes);
        let (pid, machine) = text
            .split_once('\n')
            .with_context(|| format!("malformed identity of rank {rank}: {text:?}"))?;
        let pid = pid
            .parse()
            .with_context(|| format!("malformed pid of rank {rank}: {pid:?}"))?;
        peers.push(Peer {
            rank,
            machine: machine.to_string(),
            pid,
        });
    }
    // Nobody leaves before every rank has read the store: rank 0's exit would take it down.
    pg.barrier()?;
    Ok(peers)
}

/// Whether `pid` (on this machine) has exited: no `/proc/<pid>` any more, or a zombie.
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            matches!(state, Some('Z') | Some('X') | Some('x'))
        }
    }
}

/// A suffix for an error message: which ranks on this machine have exited. The socket error can
/// arrive a moment before the peer is fully gone, so this looks again for up to half a second.
pub fn diagnose(peers: &[Peer], my_rank: usize) -> String {
    if peers.is_empty() {
        return String::new();
    }
    let machine = &peers[my_rank].machine;
    let local: Vec<&Peer> = peers
        .iter()
        .filter(|p| p.rank != my_rank && &p.machine == machine)
        .collect();
    let remote: Vec<usize> = peers
        .iter()
        .filter(|p| &p.machine != machine)
        .map(|p| p.rank)
        .collect();
    let deadline = Instant::now() + Duration::from_millis(500);
    let dead: Vec<&Peer> = loop {
        let dead: Vec<&Peer> = local
            .iter()
            .copied()
            .filter(|p| has_exited(p.pid))
            .collect();
        if !dead.is_empty() || Instant::now() >= deadline {
            break dead;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if !dead.is_empty() {
        let names: Vec<String> = dead
            .iter()
            .map(|p| format!("rank {} (pid {})", p.rank, p.pid))
            .collect();
        out.push_str(&format!("; {} on this machine exited", names.join(", ")));
    } else if !local.is_empty() {
        out.push_str("; every other rank on this machine is still running (one may be stuck, slow, or in a different collective)");
    }
    if !remote.is_empty() {
        out.push_str(&format!(
            "; ranks {remote:?} run on other machines and were not checked"
        ));
    }
    out
}
