//! Multi-process test harness shared by the test binaries of facerec-distributed.
//!
//! A test binary (declared with `harness = false`) calls [`main`] with its parent-side cases and
//! its worker functions. A case spawns the binary itself once per rank with
//! `FACEREC_DIST_TEST_WORKER=<worker>` and torchrun's variables (`RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, `MASTER_PORT=<a port free at run time>`); the child runs that worker
//! and exits 0, or prints the error and exits 3. [`Ranks`] kills every child that is still
//! running when it is dropped (also when a case panics), and [`Ranks::wait`] is bounded in time.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the worker a child process runs.
pub const WORKER_VAR: &str = "FACEREC_DIST_TEST_WORKER";
/// Exit code of a worker that returned an error.
pub const WORKER_FAILED: i32 = 3;

/// A worker: runs in a child process, Ok -> exit 0, Err -> message on stderr and exit 3.
pub type Worker = fn() -> anyhow::Result<()>;
/// A parent-side test case.
pub type Case = fn();

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, read, closed).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// The outcome of one rank.
#[derive(Debug)]
pub struct Exit {
    pub rank: usize,
    pub status: ExitStatus,
    pub stderr: String,
    /// Time from [`Ranks::spawn`] (or the last [`Ranks::mark`]) to the exit being observed.
    pub after: Duration,
}

/// The child processes of one case, one per rank.
pub struct Ranks {
    children: Vec<Option<Child>>,
    logs: Vec<PathBuf>,
    dir: tempfile::TempDir,
    start: Instant,
}

impl Ranks {
    /// Start `world` copies of this test binary running `worker`, with `MASTER_PORT=port`.
    /// `env(rank)` adds per-rank variables (they override the defaults).
    pub fn spawn(
        worker: &str,
        world: usize,
        port: u16,
        env: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ranks = Ranks {
            children: vec![],
            logs: vec![],
            dir,
            start: Instant::now(),
        };
        for rank in 0..world {
            let log = ranks.dir.path().join(format!("rank{rank}.stderr"));
            let file = std::fs::File::create(&log).expect("log file");
            let mut vars: HashMap<String, String> = HashMap::new();
            vars.insert("RANK".into(), rank.to_string());
            vars.insert("WORLD_SIZE".into(), world.to_string());
            vars.insert("LOCAL_RANK".into(), rank.to_string());
            vars.insert("MASTER_ADDR".into(), "127.0.0.1".into());
            vars.insert("MASTER_PORT".into(), port.to_string());
            vars.insert(
                "FACEREC_DIST_TEST_DIR".into(),
                ranks.dir.path().display().to_string(),
            );
            vars.extend(env(rank));
            let child = Command::new(&exe)
                .env(WORKER_VAR, worker)
                .envs(&vars)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .expect("spawning a rank");
            ranks.children.push(Some(child));
            ranks.logs.push(log);
        }
        ranks
    }

    /// The folder the children see as `FACEREC_DIST_TEST_DIR`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Restart the clock that [`Exit::after`] is measured from.
    pub fn mark(&mut self) {
        self.start = Instant::now();
    }

    /// SIGKILL one rank now.
    pub fn kill(&mut self, rank: usize) {
        if let Some(child) = self.children[rank].as_mut() {
            let _ = child.kill();
        }
    }

    /// Wait until `path` exists (a child's signal), panicking after `limit`.
    pub fn wait_for_file(&mut self, path: &Path, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !path.exists() {
            if Instant::now() > deadline {
                panic!(
                    "{} did not appear within {:?}\n{}",
                    path.display(),
                    limit,
                    self.logs_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for the listed ranks to exit, at most `limit`; the rest are killed when `self` drops.
    /// Panics (with every rank's stderr) if a rank is still running at the deadline.
    pub fn wait(&mut self, ranks: &[usize], limit: Duration) -> Vec<Exit> {
        let deadline = Instant::now() + limit;
        let mut out: Vec<Option<Exit>> = ranks.iter().map(|_| None).collect();
        loop {
            for (i, &rank) in ranks.iter().enumerate() {
                if out[i].is_some() {
                    continue;
                }
                let child = self.children[rank].as_mut().expect("rank already reaped");
                if let Some(status) = child.try_wait().expect("try_wait") {
                    let stderr = std::fs::read_to_string(&self.logs[rank]).unwrap_or_default();
                    out[i] = Some(Exit {
                        rank,
                        status,
                        stderr,
                        after: self.start.elapsed(),
                    });
                    self.children[rank] = None;
                }
            }
            if out.iter().all(Option::is_some) {
                return out.into_iter().map(Option::unwrap).collect();
            }
            if Instant::now() > deadline {
                let pending: Vec<usize> = ranks
                    .iter()
                    .zip(&out)
                    .filter(|(_, o)| o.is_none())
                    .map(|(r, _)| *r)
                    .collect();
                let logs = self.logs_text();
                self.kill_all();
                panic!("ranks {pending:?} still running after {limit:?} (killed)\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for every rank and require exit code 0 from each.
    pub fn expect_success(mut self, limit: Duration) {
        let all: Vec<usize> = (0..self.children.len()).collect();
        let exits = self.wait(&all, limit);
        let failed: Vec<&Exit> = exits.iter().filter(|e| !e.status.success()).collect();
        if !failed.is_empty() {
            let text: Vec<String> = failed
                .iter()
                .map(|e| format!("rank {} exited with {}:\n{}", e.rank, e.status, e.stderr))
                .collect();
            panic!("{}", text.join("\n"));
        }
    }

    fn logs_text(&self) -> String {
        self.logs
            .iter()
            .enumerate()
            .map(|(r, p)| {
                format!(
                    "--- rank {r} stderr:\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn kill_all(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.iter_mut().for_each(|c| *c = None);
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The folder shared by the children of one case.
pub fn shared_dir() -> PathBuf {
    PathBuf::from(std::env::var("FACEREC_DIST_TEST_DIR").expect("FACEREC_DIST_TEST_DIR"))
}

/// Entry point of a `harness = false` test binary: run a worker when asked to, else the selected
/// cases (libtest-style filters), three at a time, each timed, and exit non-zero if one failed.
pub fn main(cases: &[(&str, Case)], workers: &[(&str, Worker)]) {
    if let Ok(name) = std::env::var(WORKER_VAR) {
        let Some((_, worker)) = workers.iter().find(|(n, _)| *n == name) else {
            eprintln!("unknown worker {name:?}");
            std::process::exit(2);
        };
        match worker() {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("{e:#}");
                std::process::exit(WORKER_FAILED);
            }
        }
    }
    // libtest's conventions: positional filters (substring), `--exact`, `--skip NAME`; the values
    // of the other flags that take one are not filters.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let (mut filters, mut skips, mut exact, mut list) = (vec![], vec![], false, false);
    let mut i = 0;
    while i < argv.len() {
        match argv[i].as_str() {
            "--skip" => {
                i += 1;
                skips.extend(argv.get(i).cloned());
            }
            "--test-threads" | "--color" | "--format" | "--logfile" | "-Z" => i += 1,
            "--exact" => exact = true,
            "--list" => list = true,
            a if a.starts_with('-') => {}
            a => filters.push(a.to_string()),
        }
        i += 1;
    }
    let matches = |name: &str, f: &String| {
        if exact {
            name == f
        } else {
            name.contains(f.as_str())
        }
    };
    let selected: Vec<&(&str, Case)> = cases
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| matches(n, f)))
        .filter(|(n, _)| !skips.iter().any(|f| matches(n, f)))
        .collect();
    if list {
        for (name, _) in &selected {
            println!("{name}: test");
        }
        return;
    }
    // Cases mostly wait (for timeouts, for children), so a few run at once;
    // FACEREC_DIST_TEST_JOBS=1 runs them one after the other.
    let jobs: usize = std::env::var("FACEREC_DIST_TEST_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!("\nrunning {} tests ({jobs} at a time)", selected.len());
    let total = Instant::now();
    let n = selected.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(vec![]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(n) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((name, case)) = selected.get(i) else {
                    break;
                };
                let start = Instant::now();
                let result = std::panic::catch_unwind(case);
                let secs = start.elapsed().as_secs_f64();
                match result {
                    Ok(()) => println!("test {name} ... ok ({secs:.2} s)"),
                    Err(_) => {
                        println!("test {name} ... FAILED ({secs:.2} s)");
                        failed.lock().unwrap().push(name.to_string());
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    let secs = total.elapsed().as_secs_f64();
    if failed.is_empty() {
        println!("\ntest result: ok. {n} passed; finished in {secs:.2} s\n");
    } else {
        println!("\ntest result: FAILED. failures: {failed:?}; finished in {secs:.2} s\n");
        std::process::exit(101);
    }
}
