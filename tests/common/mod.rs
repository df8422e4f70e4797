//! Running child programs from tests: output goes through files (a chatty child cannot block
//! on a full pipe while we wait), with an optional time limit.

use std::fs::File;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished program left behind; `status` is `None` when it ran out of time (killed).
pub struct Finished {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// The program's peak resident set (its `ru_maxrss`); 0 when it was killed.
    #[allow(dead_code)] // each test crate compiles this module; not all of them read it
    pub peak_rss_bytes: u64,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs `command` with its output in `log_dir`, killing it after `timeout`.
#[allow(clippy::zombie_processes)] // wait4 below reaps the child (clippy sees no wait())
pub fn execute(
    what: &str,
    command: &mut Command,
    log_dir: &Path,
    timeout: Option<Duration>,
) -> Finished {
    std::fs::create_dir_all(log_dir).expect("create the log dir");
    let stdout_path = log_dir.join("stdout");
    let stderr_path = log_dir.join("stderr");
    let create =
        |path: &Path| File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    command
        .stdin(Stdio::null())
        .stdout(create(&stdout_path))
        .stderr(create(&stderr_path));
    let started = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {command:?}: {e}"));
    let mut peak_rss_bytes = 0;
    let status = loop {
        // wait4 instead of try_wait: it also reports the child's own peak resident set.
        let mut raw_status = 0;
        // SAFETY: an all-zero rusage is a valid value of that plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: our own child's pid; both out-pointers are valid for the call.
        let reaped = unsafe {
            libc::wait4(
                child.id() as libc::pid_t,
                &mut raw_status,
                libc::WNOHANG,
                &mut usage,
            )
        };
        if reaped == child.id() as libc::pid_t {
            use std::os::unix::process::ExitStatusExt;
            peak_rss_bytes = usage.ru_maxrss.max(0) as u64 * 1024;
            break Some(ExitStatus::from_raw(raw_status));
        }
        assert!(
            reaped == 0,
            "{what}: wait4 failed: {}",
            std::io::Error::last_os_error()
        );
        if timeout.is_some_and(|limit| started.elapsed() > limit) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("{what}: {:.2?}", started.elapsed());
    Finished {
        status,
        stdout: std::fs::read_to_string(&stdout_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        peak_rss_bytes,
    }
}

/// As `execute`, failing the test with the program's output unless it succeeds in time.
pub fn execute_ok(
    what: &str,
    command: &mut Command,
    log_dir: &Path,
    timeout: Option<Duration>,
) -> Finished {
    let finished = execute(what, command, log_dir, timeout);
    if !finished.success() {
        panic!(
            "{what} {}:\n{command:?}\n--- stdout\n{}\n--- stderr\n{}",
            match finished.status {
                Some(status) => format!("failed ({status})"),
                None => format!("timed out after {timeout:?}"),
            },
            finished.stdout,
            finished.stderr
        );
    }
    finished
}

/// `cargo build --lib` for the profile and target directory of `profile_dir`
/// (`<target>/<profile>`), so a test can build the library it links when cargo did not.
#[allow(dead_code)] // each test crate compiles this module; not all of them build the library
pub fn cargo_build_lib(profile_dir: &Path) -> Command {
    let profile = profile_dir
        .file_name()
        .and_then(|name| name.to_str())
        .expect("profile directory name");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--lib"]);
    match profile {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    if let Some(target_dir) = profile_dir.parent() {
        cargo.arg("--target-dir").arg(target_dir);
    }
    cargo
}
