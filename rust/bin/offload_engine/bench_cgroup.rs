//! `offload-engine bench --llama MODEL --memory-limit SIZE`: llama.cpp on the CPU backend in
//! a memory cgroup whose limit is below the model's size, side by side in one run: unmodified
//! llama.cpp with its mmap loading, and the engine streaming the layers from the file (disk
//! tier). Each runs as a child `offload-engine generate` placed in a fresh cgroup before it
//! starts; an unlimited unmodified run gives the tokens both must match.

use std::ffi::CString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use offload_engine::engine::EngineParams;
use offload_engine::error::{Error, Result};
use offload_engine::llama::{Hook, LlamaParams};
use offload_engine::units::format_bytes;

/// One memory cgroup with a limit, removed when dropped.
struct MemoryCgroup {
    dir: PathBuf,
    /// cgroup v2 (else v1).
    unified: bool,
}

impl MemoryCgroup {
    /// A fresh cgroup limited to `limit` bytes (memory and, where it is counted apart, swap).
    fn create(limit: u64, serial: u32) -> std::result::Result<MemoryCgroup, String> {
        let name = format!("offload-engine-bench-{}-{serial}", std::process::id());
        let mut reasons = Vec::new();
        for (root, unified) in [
            ("/sys/fs/cgroup", true),
            ("/sys/fs/cgroup/unified", true),
            ("/sys/fs/cgroup/memory", false),
        ] {
            let root = Path::new(root);
            if unified {
                let controllers =
                    std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
                if !controllers.split_whitespace().any(|c| c == "memory") {
                    reasons.push(format!("{}: no memory controller", root.display()));
                    continue;
                }
                // Children get the memory controller only when the parent hands it down.
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
            } else if !root.join("memory.limit_in_bytes").exists() {
                reasons.push(format!("{}: no cgroup v1 memory hierarchy", root.display()));
                continue;
            }
            let dir = root.join(&name);
            if let Err(e) = std::fs::create_dir(&dir) {
                reasons.push(format!("cannot create {}: {e}", dir.display()));
                continue;
            }
            let group = MemoryCgroup { dir, unified };
            let (limit_file, swap_file) = if unified {
                ("memory.max", "memory.swap.max")
            } else {
                ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
            };
            if let Err(e) = std::fs::write(group.dir.join(limit_file), limit.to_string()) {
                reasons.push(format!(
                    "cannot set {}: {e}",
                    group.dir.join(limit_file).display()
                ));
                continue;
            }
            // No swapping around the limit (where swap is accounted at all).
            let swap = if unified {
                "0".to_string()
            } else {
                limit.to_string()
            };
            let _ = std::fs::write(group.dir.join(swap_file), swap);
            return Ok(group);
        }
        Err(reasons.join("; "))
    }

    fn read(&self, file: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    /// The most memory the group used (page cache included).
    fn peak(&self) -> Option<u64> {
        self.read(if self.unified {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        })
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// What one child run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LimitedRun {
    pub what: &'static str,
    pub exit: String,
    pub tokens: Option<Vec<i64>>,
    pub tokens_identical: bool,
    pub prefill_tokens_per_second: Option<f64>,
    pub decode_tokens_per_second: Option<f64>,
    pub major_page_faults: u64,
    pub peak_rss_bytes: u64,
    pub cgroup_peak_bytes: Option<u64>,
    pub seconds: f64,
    /// The last line the run wrote to stderr when it failed (the library's message).
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LimitedReport {
    pub model: String,
    pub model_bytes: u64,
    pub limit_bytes: u64,
    pub engine_budget_bytes: u64,
    pub runs: Vec<LimitedRun>,
}

/// Runs `offload-engine generate ARGS` (in `group` when given) and collects its figures.
fn child(
    what: &'static str,
    args: &[String],
    group: Option<&MemoryCgroup>,
    reference: Option<&[i64]>,
) -> Result<LimitedRun> {
    let exe = std::env::current_exe().map_err(|e| Error::io("current_exe", e))?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(group) = group {
        let procs = CString::new(group.dir.join("cgroup.procs").to_string_lossy().as_bytes())
            .map_err(|_| Error::invalid("cgroup path with a NUL byte"))?;
        // SAFETY: between fork and exec the child only calls open and write (async-signal
        // safe) on a path made before the fork: "0" moves the writing process itself.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            })
        };
    }
    let start = std::time::Instant::now();
    let mut process = command
        .spawn()
        .map_err(|e| Error::io("cannot start offload-engine generate", e))?;
    let stderr = process.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            text
        })
    });
    let mut stdout = String::new();
    if let Some(mut out) = process.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
    let mut status = 0;
    // SAFETY: a plain rusage struct for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: our own child's pid; reaps it (the Child handle is not waited on again).
    let pid = unsafe { libc::wait4(process.id() as i32, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    let exit = if pid < 0 {
        "not waited for".to_string()
    } else if libc::WIFSIGNALED(status) {
        match libc::WTERMSIG(status) {
            libc::SIGKILL => "killed (SIGKILL: the memory limit)".to_string(),
            signal => format!("killed by signal {signal}"),
        }
    } else {
        format!("exit {}", libc::WEXITSTATUS(status))
    };
    let json: Option<serde_json::Value> = serde_json::from_str(&stdout).ok();
    let tokens: Option<Vec<i64>> = json
        .as_ref()
        .and_then(|j| j["tokens"].as_array())
        .map(|a| a.iter().filter_map(|t| t.as_i64()).collect());
    let rate = |key: &str| json.as_ref().and_then(|j| j[key].as_f64());
    Ok(LimitedRun {
        what,
        exit: exit.clone(),
        tokens_identical: match (reference, &tokens) {
            (Some(r), Some(t)) => r == t.as_slice(),
            (None, Some(_)) => true,
            _ => false,
        },
        tokens,
        prefill_tokens_per_second: rate("prefill_tokens_per_second"),
        decode_tokens_per_second: rate("decode_tokens_per_second"),
        major_page_faults: usage.ru_majflt as u64,
        peak_rss_bytes: usage.ru_maxrss as u64 * 1024,
        cgroup_peak_bytes: group.and_then(MemoryCgroup::peak),
        seconds,
        error: (!exit.ends_with(" 0"))
            .then(|| stderr.lines().last().unwrap_or_default().to_string()),
    })
}

pub fn run_memory_limited(model: &Path, limit: u64, json: bool, quick: bool) -> Result<()> {
    let model_bytes = std::fs::metadata(model)
        .map_err(|e| Error::io(model.display(), e))?
        .len();
    // The engine's weights budget: the global tensors and two slots, as the file lays them out.
    let plan = Hook::new(
        LlamaParams {
            engine: EngineParams {
                device: Some("CPU".into()),
                budget_bytes: Some(1 << 40),
                ..EngineParams::default()
            },
            compute_reserve_bytes: Some(0),
            kv_cache_bytes: Some(0),
            file_backed: true,
            ..LlamaParams::default()
        },
        model,
    )?
    .plan()?;
    let budget = plan.streaming_bytes + (1 << 20);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let n_predict = if quick { "8" } else { "32" };
    // A small ubatch keeps llama.cpp's compute buffer (ubatch x vocabulary logits) small.
    let common: Vec<String> = [
        "generate",
        &model.to_string_lossy(),
        "--device",
        "CPU",
        "--n-predict",
        n_predict,
        "--ctx-size",
        "128",
        "--ubatch",
        "8",
        "--threads",
        &threads.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let with = |extra: &[&str]| {
        let mut v = common.clone();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let unmodified = with(&["--no-engine"]);
    let budget_text = budget.to_string();
    let engine = with(&[
        "--file-backed",
        "--vram-budget",
        &budget_text,
        "--compute-reserve",
        "0",
        "--kv-cache",
        "0",
    ]);
    eprintln!("bench: [1/3] unmodified llama.cpp, no limit (the reference tokens)");
    let reference = child("unmodified llama.cpp, no limit", &unmodified, None, None)?;
    let tokens = reference.tokens.clone().unwrap_or_default();
    let mut runs = vec![reference];
    for (step, (what, args)) in [
        ("unmodified llama.cpp (mmap), limited", &unmodified),
        ("offload-engine from the file, limited", &engine),
    ]
    .into_iter()
    .enumerate()
    {
        let group = match MemoryCgroup::create(limit, step as u32) {
            Ok(group) => group,
            Err(reason) => {
                println!(
                    "memory-limited comparison skipped: no memory cgroup could be made ({reason})"
                );
                return Ok(());
            }
        };
        // Both start from the disk.
        offload_engine::diskio::drop_page_cache(model)?;
        eprintln!("bench: [{}/3] {what}", step + 2);
        runs.push(child(what, args, Some(&group), Some(&tokens))?);
    }
    let report = LimitedReport {
        model: model.display().to_string(),
        model_bytes,
        limit_bytes: limit,
        engine_budget_bytes: budget,
        runs,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data serializes")
        );
        return Ok(());
    }
    println!(
        "{} ({}) under a memory limit of {} ({:.0}% of the model); the engine's weights budget {}",
        report.model,
        format_bytes(model_bytes),
        format_bytes(limit),
        limit as f64 / model_bytes as f64 * 100.0,
        format_bytes(budget)
    );
    for r in &report.runs {
        let rate = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        println!(
            "{:<40} {:<10} prefill {:>7} tok/s, decode {:>7} tok/s, {:>6} major faults, peak RSS {:>10}, cgroup peak {:>10}, {:.1} s; tokens {}",
            r.what,
            r.exit,
            rate(r.prefill_tokens_per_second),
            rate(r.decode_tokens_per_second),
            r.major_page_faults,
            format_bytes(r.peak_rss_bytes),
            r.cgroup_peak_bytes.map_or("-".to_string(), format_bytes),
            r.seconds,
            if r.tokens_identical { "identical to the unlimited run" } else { "DIFFERENT or none" }
        );
        if let Some(error) = &r.error {
            println!("    {error}");
        }
    }
    Ok(())
}
