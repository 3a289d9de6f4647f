//! The launcher against small `sh` programs: the torchrun variables every rank sees, and what
//! happens when a rank fails, is killed, or ignores SIGTERM.
//!
//! Each child sleeps at most 30 s, so even a launcher that failed to stop its children would not
//! leave them running long; the launcher itself stops them within its grace period.

use facerec_launch::{launch, LaunchConfig};
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

fn sh(script: &str) -> Vec<OsString> {
    vec!["-c".into(), script.into()]
}

fn env(dir: &Path) -> Vec<(String, OsString)> {
    vec![("OUT".into(), dir.as_os_str().to_owned())]
}

/// Every rank wrote `$OUT/pid$RANK` before `exec sleep`: none of those processes may remain.
fn assert_all_gone(dir: &Path, world: usize) {
    for r in 0..world {
        let Ok(pid) = std::fs::read_to_string(dir.join(format!("pid{r}"))) else {
            continue;
        };
        let pid = pid.trim();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "rank {r} (pid {pid}) is still running"
        );
    }
}

#[test]
fn every_rank_sees_torchrun_variables() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LaunchConfig::local(3);
    let script = r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $GROUP_RANK $MASTER_ADDR $MASTER_PORT" > "$OUT/rank$RANK""#;
    let exits = launch(&cfg, Path::new("sh"), &sh(script), &env(dir.path())).unwrap();
    assert_eq!(
        exits.iter().map(|e| e.rank).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let mut ports = vec![];
    for r in 0..3 {
        let line = std::fs::read_to_string(dir.path().join(format!("rank{r}"))).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &f[..6],
            &[
                r.to_string().as_str(),
                "3",
                r.to_string().as_str(),
                "3",
                "0",
                "127.0.0.1"
            ],
            "{line}"
        );
        ports.push(f[6].parse::<u16>().unwrap());
    }
    assert!(
        ports[0] != 0 && ports.iter().all(|p| *p == ports[0]),
        "{ports:?}"
    );
}

#[test]
fn second_node_gets_the_upper_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LaunchConfig {
        nnodes: 2,
        node_rank: 1,
        master_addr: "10.1.2.3".into(),
        master_port: Some(29555),
        ..LaunchConfig::local(2)
    };
    let script = r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $GROUP_RANK $MASTER_ADDR $MASTER_PORT" > "$OUT/rank$RANK""#;
    launch(&cfg, Path::new("sh"), &sh(script), &env(dir.path())).unwrap();
    for (rank, local) in [(2, 0), (3, 1)] {
        let line = std::fs::read_to_string(dir.path().join(format!("rank{rank}"))).unwrap();
        assert_eq!(line.trim(), format!("{rank} 4 {local} 1 10.1.2.3 29555"));
    }
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LaunchConfig::local(3);
    let start = Instant::now();
    let script = r#"echo $$ > "$OUT/pid$RANK"; if [ "$RANK" = 1 ]; then sleep 0.2; exit 7; fi; exec sleep 30"#;
    let err = launch(&cfg, Path::new("sh"), &sh(script), &env(dir.path())).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("rank 1 (local rank 1) failed: exit code 7"),
        "{msg}"
    );
    assert!(msg.contains("stopped ranks [0, 2]"), "{msg}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert_all_gone(dir.path(), 3);
}

#[test]
fn a_killed_rank_is_reported_with_its_signal() {
    let cfg = LaunchConfig::local(2);
    let err = launch(
        &cfg,
        Path::new("sh"),
        &sh(r#"if [ "$RANK" = 0 ]; then kill -9 $$; fi; exec sleep 30"#),
        &[],
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("rank 0 (local rank 0) failed: killed by signal 9 (SIGKILL)"),
        "{msg}"
    );
}

#[test]
fn ranks_ignoring_sigterm_are_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LaunchConfig {
        grace: Duration::from_millis(300),
        ..LaunchConfig::local(2)
    };
    let start = Instant::now();
    let script = r#"echo $$ > "$OUT/pid$RANK"; if [ "$RANK" = 1 ]; then sleep 0.2; exit 1; fi; trap '' TERM; exec sleep 30"#;
    let err = launch(&cfg, Path::new("sh"), &sh(script), &env(dir.path())).unwrap_err();
    assert!(
        err.to_string()
            .contains("rank 1 (local rank 1) failed: exit code 1"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert_all_gone(dir.path(), 2);
}

#[test]
fn a_missing_program_is_a_clear_error() {
    let err = launch(
        &LaunchConfig::local(2),
        Path::new("/nonexistent/facerec"),
        &[],
        &[],
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("starting rank 0: /nonexistent/facerec"),
        "{err:#}"
    );
}
