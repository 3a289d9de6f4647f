//! With `Policy::Keep` applied, a block of 96 MiB (three times glibc's largest dynamic mmap
//! threshold) allocated, touched and freed ten times on the main thread is faulted in about once;
//! with glibc's defaults every round `mmap`s it afresh and faults in all its pages again (checked
//! in a child process of this binary started with `system`).
//!
//! Runs without the libtest harness so that the allocations come from the main thread (glibc's
//! main arena), as a training loop's do.

use std::process::Command;

const BLOCK: usize = 96 << 20;
const ROUNDS: u64 = 10;
const PAGE: u64 = 4096;

/// Minor faults of ROUNDS rounds of malloc, touch every page, free.
fn faults_of_rounds() -> u64 {
    let before = facerec_process::minor_faults();
    for _ in 0..ROUNDS {
        // SAFETY: plain malloc/free of a block we own; every byte written is inside it.
        unsafe {
            let p = libc::malloc(BLOCK) as *mut u8;
            assert!(!p.is_null(), "malloc of {BLOCK} bytes failed");
            for off in (0..BLOCK).step_by(PAGE as usize) {
                std::ptr::write_volatile(p.add(off), 1);
            }
            libc::free(p as *mut libc::c_void);
        }
    }
    facerec_process::minor_faults() - before
}

fn main() {
    let pages = BLOCK as u64 / PAGE;
    if std::env::args().nth(1).as_deref() == Some("child-system") {
        facerec_process::malloc::apply(facerec_process::malloc::Policy::System).unwrap();
        println!("{}", faults_of_rounds());
        return;
    }
    facerec_process::malloc::apply(facerec_process::malloc::Policy::Keep)
        .expect("mallopt accepted");
    let kept = faults_of_rounds();
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("child-system")
        .output()
        .expect("child runs");
    let system: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("child prints a count");
    println!("keeps_memory: {ROUNDS} rounds of {} MiB ({pages} pages): {kept} minor faults kept, {system} with glibc defaults", BLOCK >> 20);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        assert!(kept < pages * 2, "FACEREC_MALLOC=keep: {kept} faults for {ROUNDS} rounds of {pages} pages (expected about {pages})");
        assert!(system >= pages * (ROUNDS - 1), "glibc defaults should fault every round: {system} faults (the check could not fail otherwise)");
    }
    println!("test keeps_memory ... ok");
}
