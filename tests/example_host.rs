//! The example host examples/pipeline_host, built with CMake against this library and the
//! vendored ggml's headers, then run through every offload mode on the CPU backend:
//!
//! - a reference job with room for everything (`--offload-mode none`, a roomy budget);
//! - each mode under budgets sized from the reference's printed component sizes so that
//!   components must leave the device; modes that cannot fit a stage must fail cleanly;
//! - `layer_streaming` with a budget below the diffusion model's size (it then streams), at
//!   prefetch depths 0, 1 and 3;
//! - two jobs in one process with and without `--no-reload-diffusion`;
//! - placement overrides (`--offload-cond-stage`, `--no-offload-cond-stage`);
//! - an impossible budget: exit status 1, the library's message, no signal.
//!
//! Every successful run must print the same image checksum. The CPU "device" reports system
//! memory as free, so every run passes `--vram-budget`.

mod common;
#[path = "common/example.rs"]
mod example;

use common::Finished;
use example::{build_example, have, static_library, work_dir, RUN_TIMEOUT};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Slack added to computed budgets so that rounding in the library never decides a case.
const SLACK: u64 = 64 << 10;

const COND: &str = "conditioner";
const DIT: &str = "diffusion_model";
const VAE: &str = "vae";

/// One component's line after a stage: `placement[run R, WHEN] NAME PLACEMENT key=value...`.
#[derive(Debug, Clone)]
struct Placement {
    run: u32,
    when: String,
    name: String,
    placement: String,
    values: BTreeMap<String, u64>,
}

impl Placement {
    fn get(&self, key: &str) -> u64 {
        *self
            .values
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {self:?}"))
    }
}

/// A successful run's parsed output.
#[derive(Debug)]
struct Report {
    stdout: String,
    stderr: String,
    checksum: String,
    placements: Vec<Placement>,
    stats: BTreeMap<String, u64>,
    /// Component name -> (bytes, stage_need) from the `component` lines.
    components: BTreeMap<String, (u64, u64)>,
}

impl Report {
    fn parse(stdout: &str, stderr: &str) -> Report {
        let last = stdout.lines().last().unwrap_or_default();
        let checksum = last
            .strip_prefix("checksum: ")
            .unwrap_or_else(|| panic!("the last line is not `checksum: ...`:\n{stdout}"));
        assert!(
            checksum.len() == 16 && checksum.bytes().all(|b| b.is_ascii_hexdigit()),
            "bad checksum line {last:?}"
        );
        let mut placements = Vec::new();
        let mut stats = BTreeMap::new();
        let mut components = BTreeMap::new();
        for line in stdout.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("placement[run ") {
                let (head, tail) = rest.split_once(']').expect("placement line");
                let (run, when) = head.split_once(", ").expect("placement header");
                let mut words = tail.split_whitespace();
                let name = words.next().expect("component name").to_string();
                let placement = words.next().expect("placement").to_string();
                placements.push(Placement {
                    run: run.parse().expect("run number"),
                    when: when.to_string(),
                    name,
                    placement,
                    values: key_values(words),
                });
            } else if let Some(rest) = line.strip_prefix("pipeline stats:") {
                stats = key_values(rest.split_whitespace());
            } else if let Some(rest) = line.strip_prefix("component ") {
                let mut words = rest.split_whitespace();
                let name = words.next().expect("component name").to_string();
                let values = key_values(words);
                components.insert(name, (values["bytes"], values["stage_need"]));
            }
        }
        assert!(!stats.is_empty(), "no pipeline stats line:\n{stdout}");
        Report {
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
            checksum: checksum.to_string(),
            placements,
            stats,
            components,
        }
    }

    /// The last placement line printed for `name`.
    fn last(&self, name: &str) -> &Placement {
        self.placements
            .iter()
            .rev()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no placement of {name}:\n{}", self.stdout))
    }

    fn at(&self, run: u32, when: &str, name: &str) -> &Placement {
        self.placements
            .iter()
            .find(|p| p.run == run && p.when == when && p.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no placement of {name} in run {run} {when}:\n{}",
                    self.stdout
                )
            })
    }

    fn stat(&self, key: &str) -> u64 {
        *self
            .stats
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in the pipeline stats:\n{}", self.stdout))
    }
}

/// `key=value` words with integer values; other words are skipped.
fn key_values<'a>(words: impl Iterator<Item = &'a str>) -> BTreeMap<String, u64> {
    words
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

struct Host {
    exe: PathBuf,
    dir: PathBuf,
    model: PathBuf,
    runs: usize,
}

impl Host {
    fn command(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.current_dir(&self.dir)
            .arg("--model")
            .arg(&self.model)
            .args([
                "--device",
                "CPU",
                "--streaming-min-vram",
                "0",
                "--margin",
                "0",
            ])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("OFFLOAD_ENGINE_PROFILE");
        cmd
    }

    fn execute(&mut self, label: &str, args: &[String]) -> (Finished, Command) {
        self.runs += 1;
        let mut cmd = self.command(args);
        let log_dir = self.dir.join("logs").join(format!("{:02}", self.runs));
        let what = format!("pipeline_host {label}");
        let finished = common::execute(&what, &mut cmd, &log_dir, Some(RUN_TIMEOUT));
        (finished, cmd)
    }

    /// Runs the host, which must succeed, and parses what it printed.
    fn ok(&mut self, label: &str, args: &[String]) -> Report {
        let (out, cmd) = self.execute(label, args);
        if !out.success() {
            panic!(
                "{label}: pipeline_host failed ({:?}):\n{cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
                out.status, out.stdout, out.stderr
            );
        }
        let report = Report::parse(&out.stdout, &out.stderr);
        println!(
            "{label:<44} checksum {}  loads {:>2}  unloads {:>2}  peak {:>9} B  bytes_loaded {:>10}",
            report.checksum,
            report.stat("loads"),
            report.stat("unloads"),
            report.stat("peak_device_bytes"),
            report.stat("bytes_loaded")
        );
        report
    }

    /// Runs the host, which must exit with status 1 (not a signal) and print an error
    /// containing every one of `expected`; returns stderr.
    fn fails(&mut self, label: &str, args: &[String], expected: &[&str]) -> String {
        let (out, cmd) = self.execute(label, args);
        let context = || {
            format!(
                "{cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
                out.stdout, out.stderr
            )
        };
        assert_eq!(
            out.status.and_then(|s| s.code()),
            Some(1),
            "{label}: expected exit status 1 (a clean failure), got {:?}:\n{}",
            out.status,
            context()
        );
        for text in expected {
            assert!(
                out.stderr.contains(text),
                "{label}: stderr does not mention {text:?}:\n{}",
                context()
            );
        }
        assert!(
            !out.stdout.contains("\nchecksum: "),
            "{label}: a failed run printed a checksum:\n{}",
            context()
        );
        let message = out
            .stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default()
            .to_string();
        println!("{label:<44} fails as expected: {message}");
        message
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn with_budget(list: &[&str], budget: u64) -> Vec<String> {
    let mut v = args(list);
    v.push("--vram-budget".into());
    v.push(budget.to_string());
    v
}

#[test]
fn example_host_runs_every_offload_mode_with_one_checksum() {
    let started = Instant::now();
    if !have("cmake") {
        println!("note: cmake not found; skipping the example host test");
        return;
    }
    let library = static_library();
    let exe = build_example("pipeline_host", &library);
    let dir = work_dir("pipeline_host").join("run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the run dir");
    let mut host = Host {
        exe,
        model: dir.join("pipeline_model.gguf"),
        dir,
        runs: 0,
    };

    // (a) The reference: everything fits, nothing moves. It writes the model file.
    let reference = host.ok(
        "reference (none, 1G)",
        &with_budget(&["--offload-mode", "none", "--profile"], 1 << 30),
    );
    assert!(
        reference.stdout.contains("(written,"),
        "the first run should write the model:\n{}",
        reference.stdout
    );
    assert!(host.model.is_file(), "no model file was written");
    assert_eq!(reference.stat("unloads"), 0, "{}", reference.stdout);
    for name in [COND, DIT, VAE] {
        let p = reference.at(1, "after vae", name);
        assert_eq!(p.placement, "RESIDENT", "{}", reference.stdout);
        assert_eq!(p.get("unloads"), 0);
    }
    let expected = reference.checksum.clone();

    // Sizes as the pipeline sees them: resident bytes and declared stage needs.
    let resident = |name: &str| reference.last(name).get("resident_bytes");
    let need = |name: &str| reference.components[name].1;
    let (c, d, v) = (resident(COND), resident(DIT), resident(VAE));
    let (nc, nd, nv) = (need(COND), need(DIT), need(VAE));
    println!(
        "sizes: conditioner {c} + {nc}, diffusion_model {d} + {nd}, vae {v} + {nv} (bytes + stage need)"
    );
    let mut checksums = vec![("reference".to_string(), expected.clone())];
    let mut record = |label: &str, report: &Report| {
        checksums.push((label.to_string(), report.checksum.clone()));
    };

    // (b) Budgets that force components off the device.
    // b1: the diffusion stage does not fit beside the conditioner; the decoder fits beside
    // the diffusion model.
    let b1 = (d + v + nv).max(d + nd).max(c + nc) + SLACK;
    assert!(
        b1 < c + d + nd,
        "model proportions changed: budget {b1} cannot force the conditioner out \
         (conditioner {c}, diffusion {d} + {nd})"
    );
    let r = host.ok(
        "cond_only, b1",
        &with_budget(&["--offload-mode", "cond_only"], b1),
    );
    assert!(
        r.stdout.contains("(read,"),
        "later runs should read the model file:\n{}",
        r.stdout
    );
    assert!(r.last(COND).get("unloads") >= 1, "{}", r.stdout);
    assert_eq!(r.last(DIT).get("unloads"), 0, "{}", r.stdout);
    assert_eq!(r.at(1, "during diffusion_model", COND).placement, "OFF");
    assert_eq!(
        r.at(1, "during vae", DIT).placement,
        "RESIDENT",
        "cond_only keeps the diffusion model:\n{}",
        r.stdout
    );
    assert!(r.stat("peak_device_bytes") <= b1, "{}", r.stdout);
    record("cond_only b1", &r);

    host.fails(
        "none, b1",
        &with_budget(&["--offload-mode", "none"], b1),
        &[
            "stage_begin diffusion_model",
            "insufficient device memory",
            "cannot be placed",
        ],
    );

    // Overrides: `none` with the conditioner forced off works; `cond_only` with it kept
    // does not.
    let r = host.ok(
        "none + --offload-cond-stage, b1",
        &with_budget(&["--offload-mode", "none", "--offload-cond-stage"], b1),
    );
    assert!(r.last(COND).get("unloads") >= 1, "{}", r.stdout);
    record("none + offload-cond-stage b1", &r);
    host.fails(
        "cond_only + --no-offload-cond-stage, b1",
        &with_budget(
            &["--offload-mode", "cond_only", "--no-offload-cond-stage"],
            b1,
        ),
        &["insufficient device memory", "cannot be placed"],
    );

    // b2: the diffusion model alone (with its stage) fits, but not beside the decoder.
    let b2 = (d + nd).max(c + nc).max(v + nv) + SLACK;
    assert!(
        b2 < d + v + nv,
        "model proportions changed: budget {b2} cannot force the diffusion model out \
         (diffusion {d}, vae {v} + {nv})"
    );
    let r = host.ok(
        "cond_diffusion, b2",
        &with_budget(&["--offload-mode", "cond_diffusion"], b2),
    );
    assert!(r.last(COND).get("unloads") >= 1, "{}", r.stdout);
    assert!(r.last(DIT).get("unloads") >= 1, "{}", r.stdout);
    assert_eq!(r.at(1, "during vae", DIT).placement, "OFF", "{}", r.stdout);
    assert!(r.stat("peak_device_bytes") <= b2, "{}", r.stdout);
    record("cond_diffusion b2", &r);

    let r = host.ok(
        "aggressive, b2",
        &with_budget(&["--offload-mode", "aggressive"], b2),
    );
    for name in [COND, DIT, VAE] {
        assert!(r.last(name).get("unloads") >= 1, "{name}:\n{}", r.stdout);
    }
    assert_eq!(r.at(1, "after vae", VAE).placement, "OFF", "{}", r.stdout);
    assert!(r.stat("unloads") >= 3, "{}", r.stdout);
    assert!(r.stat("peak_device_bytes") <= b2, "{}", r.stdout);
    record("aggressive b2", &r);

    let r = host.ok(
        "layer_streaming, b2",
        &with_budget(&["--offload-mode", "layer_streaming"], b2),
    );
    assert_eq!(
        r.at(1, "during diffusion_model", DIT).placement,
        "RESIDENT",
        "the diffusion model fits b2 and should not stream:\n{}",
        r.stdout
    );
    record("layer_streaming b2", &r);

    host.fails(
        "cond_only, b2",
        &with_budget(&["--offload-mode", "cond_only"], b2),
        &["stage_begin vae", "insufficient device memory"],
    );

    // (c) A budget below the diffusion model's size: only layer_streaming runs, and the
    // diffusion model streams.
    let b3 = (d * 3 / 4).max(c + nc).max(v + nv);
    assert!(
        b3 < d,
        "budget {b3} is not below the diffusion model's {d} bytes"
    );
    let trace = host.dir.join("diffusion_trace.json");
    for prefetch in ["0", "1", "3"] {
        let label = format!("layer_streaming, b3 < diffusion, prefetch {prefetch}");
        let mut list = args(&[
            "--offload-mode",
            "layer_streaming",
            "--streaming-prefetch",
            prefetch,
            "--profile",
            "--offload-log",
            "--vram-budget",
            &b3.to_string(),
        ]);
        if prefetch == "1" {
            list.push("--trace".into());
            list.push(trace.display().to_string());
        }
        let r = host.ok(&label, &list);
        // --offload-log: the library logs every move.
        for line in [
            "unload 'conditioner'",
            "load 'diffusion_model'",
            "streaming",
        ] {
            assert!(
                r.stderr.contains(line),
                "no {line:?} in the move log:\n{}",
                r.stderr
            );
        }
        let p = r.at(1, "during diffusion_model", DIT);
        assert_eq!(p.placement, "STREAMING", "{}", r.stdout);
        assert!(p.get("streamed_layers") >= 1, "{}", r.stdout);
        assert!(p.get("device_bytes") < d, "{}", r.stdout);
        assert!(r.stat("peak_device_bytes") <= b3, "{}", r.stdout);
        record(&label, &r);
    }
    let text = std::fs::read_to_string(&trace)
        .unwrap_or_else(|e| panic!("--trace wrote no {}: {e}", trace.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("the trace is JSON");
    let spans = json["traceEvents"]
        .as_array()
        .expect("traceEvents")
        .iter()
        .filter(|e| e["ph"] == "X")
        .count();
    assert!(spans > 0, "the trace has no spans:\n{text}");
    for mode in ["cond_diffusion", "aggressive"] {
        host.fails(
            &format!("{mode}, b3"),
            &with_budget(&["--offload-mode", mode], b3),
            &["stage_begin diffusion_model", "insufficient device memory"],
        );
    }

    // (d) Two jobs per process, to exercise the reload policy: at the end of a job an evicted
    // diffusion model goes back on the device when it fits beside the next job's first stage
    // (the conditioner's); --no-reload-diffusion leaves it off.
    // b5: in aggressive mode everything leaves after its stage; the diffusion model fits
    // beside the conditioner's stage, so it is reloaded between the jobs.
    let b5 = d + c + nc + SLACK;
    let with_reload = host.ok(
        "aggressive, b5, --runs 2",
        &with_budget(&["--offload-mode", "aggressive", "--runs", "2"], b5),
    );
    let without_reload = host.ok(
        "aggressive, b5, --runs 2, --no-reload-diffusion",
        &with_budget(
            &[
                "--offload-mode",
                "aggressive",
                "--runs",
                "2",
                "--no-reload-diffusion",
            ],
            b5,
        ),
    );
    for r in [&with_reload, &without_reload] {
        assert!(r.stdout.contains("run 2 checksum: "), "{}", r.stdout);
        assert_eq!(r.at(1, "after diffusion_model", DIT).placement, "OFF");
        assert!(r.stat("peak_device_bytes") <= b5, "{}", r.stdout);
    }
    // The reload runs in the background after run_end; run 2 finds the model placed.
    assert_eq!(
        with_reload.at(2, "during conditioner", DIT).placement,
        "RESIDENT",
        "expected the diffusion model to be reloaded between the jobs:\n{}",
        with_reload.stdout
    );
    assert_eq!(
        with_reload.at(2, "during conditioner", DIT).get("loads"),
        2,
        "{}",
        with_reload.stdout
    );
    assert_eq!(
        without_reload.at(2, "during conditioner", DIT).placement,
        "OFF",
        "--no-reload-diffusion should leave the diffusion model off:\n{}",
        without_reload.stdout
    );
    record("aggressive b5 runs 2", &with_reload);
    record("aggressive b5 runs 2 no reload", &without_reload);

    // b4: the job fits with the decoder resident, the decoder's stage pushes the diffusion
    // model out, and the next job's conditioner would push a reloaded one straight out
    // again: no reload.
    let b4 = d + v + (nd + nv) / 2;
    assert!(
        d + nd + v <= b4 && b4 < d + v + nv && b4 < d + v + c + nc,
        "model proportions changed: b4 {b4} is outside [{}, {})",
        d + nd + v,
        (d + v + nv).min(d + v + c + nc)
    );
    let r = host.ok(
        "cond_diffusion, b4, --runs 2",
        &with_budget(&["--offload-mode", "cond_diffusion", "--runs", "2"], b4),
    );
    assert_eq!(r.at(1, "during vae", DIT).placement, "OFF", "{}", r.stdout);
    assert_eq!(
        r.at(2, "during conditioner", DIT).placement,
        "OFF",
        "a reload the next stage would undo should be skipped:\n{}",
        r.stdout
    );
    assert!(r.stat("peak_device_bytes") <= b4, "{}", r.stdout);
    record("cond_diffusion b4 runs 2", &r);

    let r = host.ok(
        "layer_streaming, b3, --runs 2",
        &with_budget(&["--offload-mode", "layer_streaming", "--runs", "2"], b3),
    );
    assert_eq!(
        r.at(2, "during diffusion_model", DIT).placement,
        "STREAMING",
        "{}",
        r.stdout
    );
    record("layer_streaming b3 runs 2", &r);

    // (e) Budgets nothing fits in: a clean error, no crash.
    host.fails(
        "none, 1M",
        &with_budget(&["--offload-mode", "none"], 1 << 20),
        &["insufficient device memory", "cannot be placed"],
    );
    host.fails(
        "layer_streaming, 1M",
        &with_budget(&["--offload-mode", "layer_streaming"], 1 << 20),
        &["insufficient device memory", "cannot be placed"],
    );

    // On CUDA (a library built with --features cuda): the streamed job matches the resident
    // one there too (CUDA's kernels differ from the CPU's, so its checksum may too).
    if cfg!(feature = "cuda") {
        let resident_job = host.ok(
            "CUDA0 reference (none, 1G)",
            &with_budget(&["--device", "CUDA0", "--offload-mode", "none"], 1 << 30),
        );
        let streamed_job = host.ok(
            "CUDA0 layer_streaming, b3",
            &with_budget(
                &["--device", "CUDA0", "--offload-mode", "layer_streaming"],
                b3,
            ),
        );
        assert_eq!(
            streamed_job.at(1, "during diffusion_model", DIT).placement,
            "STREAMING",
            "{}",
            streamed_job.stdout
        );
        assert_eq!(
            resident_job.checksum, streamed_job.checksum,
            "CUDA: the streamed job's image differs from the resident job's"
        );
    }

    let differing: Vec<String> = checksums
        .iter()
        .filter(|(_, sum)| *sum != expected)
        .map(|(label, sum)| format!("{label}: {sum}"))
        .collect();
    assert!(
        differing.is_empty(),
        "checksums differ from the reference {expected}:\n{}",
        differing.join("\n")
    );
    println!(
        "{} successful runs, all with checksum {expected}",
        checksums.len()
    );
    eprintln!("example host test: {:.1?} in all", started.elapsed());
}
