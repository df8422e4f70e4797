//! stable-diffusion.cpp through the drop-in: integrations/stable-diffusion.cpp/build.sh
//! builds the patched sd-cli (and the unpatched one) into the target directory once, and
//! sd-model-gen writes two models with sd.cpp's own tensor lists and generated weights: SD 1.x
//! with the tiny UNet, CLIP-L and TAESD, and a small Flux with CLIP-L and TAEF1. At 64x64, 4
//! steps, CFG and a fixed seed on the CPU:
//!
//! - for each model, the patched sd-cli's PNG is byte-identical to the unpatched one's at three
//!   budgets (all resident; about half of the diffusion model; its global tensors plus two
//!   slots) and prefetch depths 0, 1, 2, and its summary line shows what streamed;
//! - two images in one process (a batch) match the unpatched batch;
//! - a budget below the largest segment exits with the planner's message and the flags to
//!   try, and writes no image.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const RUN_TIMEOUT: Duration = Duration::from_secs(600);

struct Build {
    bin: PathBuf,
    models: PathBuf,
}

/// A generated model: `sd-model-gen <name>` writes `<name>.gguf` and `tae`; sd.cpp names its
/// diffusion model's runner `runner`.
struct Model {
    name: &'static str,
    tae: &'static str,
    runner: &'static str,
}

const SD1_TINY: Model = Model {
    name: "sd1-tiny",
    tae: "taesd.gguf",
    runner: "unet",
};
const FLUX_TINY: Model = Model {
    name: "flux-tiny",
    tae: "taef1.gguf",
    runner: "flux",
};

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Builds sd.cpp (minutes, once per target directory) and generates the test models.
fn build() -> &'static Build {
    static BUILD: OnceLock<Build> = OnceLock::new();
    BUILD.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("target/tmp lies in the target directory")
            .to_path_buf();
        let out = target.join("sd-cpp");
        let logs = out.join("logs");
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("integrations/stable-diffusion.cpp/build.sh");
        common::execute_ok(
            "integrations/stable-diffusion.cpp/build.sh",
            Command::new("bash").arg(&script).arg(&out),
            &logs.join("build"),
            Some(Duration::from_secs(3600)),
        );
        let bin = out.join("bin");
        let models = out.join("models");
        std::fs::create_dir_all(&models).unwrap();
        let generator = bin.join("sd-model-gen");
        for model in [SD1_TINY, FLUX_TINY] {
            // Made again when the generator is newer than what it made.
            let made = [format!("{}.gguf", model.name), model.tae.to_string()]
                .iter()
                .map(|f| modified(&models.join(f)))
                .min()
                .flatten();
            if made.is_none() || made < modified(&generator) {
                common::execute_ok(
                    &format!("sd-model-gen {}", model.name),
                    Command::new(&generator).arg(model.name).arg(&models),
                    &logs.join(format!("model-gen-{}", model.name)),
                    Some(RUN_TIMEOUT),
                );
            }
        }
        Build { bin, models }
    })
}

/// One sd-cli run; `dir` gets its image and logs.
fn sd_cli(
    model: &Model,
    binary: &str,
    dir: &Path,
    extra: &[String],
) -> (common::Finished, PathBuf) {
    let file = build().models.join(format!("{}.gguf", model.name));
    sd_cli_on(model, &file, binary, dir, extra)
}

/// As `sd_cli`, with the model read from `file`.
fn sd_cli_on(
    model: &Model,
    file: &Path,
    binary: &str,
    dir: &Path,
    extra: &[String],
) -> (common::Finished, PathBuf) {
    let b = build();
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.join("out.png");
    let _ = std::fs::remove_file(&image);
    let mut command = Command::new(b.bin.join(binary));
    command
        .arg("-m")
        .arg(file)
        .arg("--taesd")
        .arg(b.models.join(model.tae))
        .args(["-p", "a lighthouse on a cliff", "-n", "blurry"])
        .args([
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "4",
            "--cfg-scale",
            "7",
            "--seed",
            "42",
        ])
        .args([
            "--sampling-method",
            "euler",
            "-t",
            "2",
            "--disable-image-metadata",
        ])
        .arg("-o")
        .arg(&image)
        .args(extra);
    let finished = common::execute(
        &format!("{binary} ({}) {}", model.name, extra.join(" ")),
        &mut command,
        &dir.join("logs"),
        Some(RUN_TIMEOUT),
    );
    (finished, image)
}

fn scratch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("sd_cpp")
        .join(name)
}

/// The figures the hook prints for a runner, and the budgets the tests make from them.
struct Sizes {
    global: u64,
    layers: u64,
    largest: u64,
    reserve: u64,
}

impl Sizes {
    /// The global tensors plus two slots of the largest layer (prefetch depth 1 fits).
    fn two_slots(&self) -> u64 {
        self.global + 2 * self.largest + self.reserve + (1 << 20)
    }

    /// The global tensors plus about half the layers.
    fn half(&self) -> u64 {
        self.global + self.layers / 2 + self.reserve
    }
}

/// From a runner's line `offload-engine: unet: ... global G B, layers L B (largest M B),
/// reserve R B; ...`.
fn sizes(stderr: &str, runner: &str) -> Sizes {
    let line = stderr
        .lines()
        .find(|l| l.contains(&format!("offload-engine: {runner}:")) && l.contains(" B, layers "))
        .unwrap_or_else(|| panic!("no plan line for {runner} in\n{stderr}"));
    let number_after = |key: &str| -> u64 {
        let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    Sizes {
        global: number_after("global "),
        layers: number_after("layers "),
        largest: number_after("(largest "),
        reserve: number_after("reserve "),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.9}", bytes as f64 / (1u64 << 30) as f64)
}

fn streaming_args(budget: u64, depth: u32) -> Vec<String> {
    vec![
        "--stream-layers".into(),
        "--offload-to-cpu".into(),
        "--max-vram".into(),
        gib(budget),
        "--layer-prefetch-depth".into(),
        depth.to_string(),
    ]
}

fn png(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The unpatched image, then the patched sd-cli all resident, at about half the diffusion
/// model and at its global tensors plus two slots, each at prefetch depths 0, 1 and 2.
fn streams_with_the_unpatched_image(model: &Model) {
    let dir = |name: &str| scratch(&format!("{}/{name}", model.name));
    let (reference, reference_png) = sd_cli(model, "sd-cli-unpatched", &dir("reference"), &[]);
    assert!(reference.success(), "{}", reference.stderr);
    let expected = png(&reference_png);

    // A roomy budget first: it reports the sizes the other budgets are made from.
    let (roomy, image) = sd_cli(model, "sd-cli", &dir("roomy"), &streaming_args(64 << 30, 1));
    assert!(roomy.success(), "{}", roomy.stderr);
    assert_eq!(png(&image), expected, "all resident");
    let sizes = sizes(&roomy.stderr, model.runner);
    let budgets = [
        ("half", sizes.half()),
        ("global + 2 slots", sizes.two_slots()),
    ];
    for (name, budget) in budgets {
        for depth in [0u32, 1, 2] {
            let what = format!(
                "{}: {name} ({budget} B), prefetch depth {depth}",
                model.name
            );
            let (run, image) = sd_cli(
                model,
                "sd-cli",
                &dir(&format!("{}-{depth}", name.replace([' ', '+'], "_"))),
                &streaming_args(budget, depth),
            );
            assert!(run.success(), "{what}:\n{}", run.stderr);
            assert_eq!(png(&image), expected, "{what}: the image differs");
            let summary = run
                .stderr
                .lines()
                .find(|l| {
                    l.starts_with(&format!("offload-engine: {}:", model.runner))
                        && l.contains(" streamed layers")
                })
                .unwrap_or_else(|| panic!("{what}: no summary line in\n{}", run.stderr));
            assert!(
                !summary.contains(" 0 streamed layers"),
                "{what}: nothing streamed: {summary}"
            );
            assert_traffic_agrees(&run.stderr, model.runner, &what);
        }
    }
}

/// The bytes the placement line says each pass streams, times the passes, are the bytes the
/// summary says were streamed (one placement per runner in sd-cli).
fn assert_traffic_agrees(stderr: &str, runner: &str, what: &str) {
    let prefix = format!("offload-engine: {runner}: ");
    let line = |needle: &str| {
        stderr
            .lines()
            .find(|l| l.starts_with(&prefix) && l.contains(needle))
            .unwrap_or_else(|| panic!("{what}: no line with {needle:?} in\n{stderr}"))
    };
    let number_before = |line: &str, key: &str| -> u64 {
        let head = &line[..line.find(key).unwrap_or_else(|| panic!("{key} in {line}"))];
        head.rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let per_pass = number_before(line(" B per pass)"), " B per pass)");
    let summary = line(" passes; ");
    let passes = number_before(summary, " passes; ");
    let streamed = number_before(summary, " streamed); ");
    assert_eq!(
        streamed,
        per_pass * passes,
        "{what}: {per_pass} B per pass x {passes} passes"
    );
}

#[test]
fn sd1_tiny_unet_streams_with_the_unpatched_image() {
    streams_with_the_unpatched_image(&SD1_TINY);
}

#[test]
fn flux_streams_with_the_unpatched_image() {
    streams_with_the_unpatched_image(&FLUX_TINY);
}

/// A LoRA (sd-model-gen's, over the UNet's attention) in both of sd.cpp's modes: merged into
/// the weights before sampling (`immediately`) and applied in the graph (`at_runtime`), with
/// the UNet streamed at its global tensors plus two slots. sd.cpp's own graph-cut path lost a
/// runtime LoRA's tensors in every segment (they were cleared as if they were activations);
/// the patch keeps them.
#[test]
fn loras_in_both_modes_stream_with_the_unpatched_image() {
    let model = &SD1_TINY;
    let loras = build().models.join("loras");
    let dir = |name: &str| scratch(&format!("lora/{name}"));
    let (plain, plain_png) = sd_cli(model, "sd-cli-unpatched", &dir("no-lora"), &[]);
    assert!(plain.success(), "{}", plain.stderr);
    let (roomy, _) = sd_cli(model, "sd-cli", &dir("roomy"), &streaming_args(64 << 30, 1));
    let budget = sizes(&roomy.stderr, model.runner).two_slots();
    for mode in ["immediately", "at_runtime"] {
        let lora = vec![
            "-p".to_string(),
            "a lighthouse on a cliff<lora:sd1-tiny-lora:0.5>".into(),
            "--lora-model-dir".into(),
            loras.display().to_string(),
            "--lora-apply-mode".into(),
            mode.into(),
        ];
        let (reference, reference_png) = sd_cli(
            model,
            "sd-cli-unpatched",
            &dir(&format!("{mode}-reference")),
            &lora,
        );
        assert!(reference.success(), "{mode}: {}", reference.stderr);
        assert!(
            reference
                .stdout
                .contains("(72 / 72) LoRA tensors have been applied"),
            "{mode}: the LoRA was not applied:\n{}",
            reference.stdout
        );
        assert_ne!(
            png(&reference_png),
            png(&plain_png),
            "{mode}: the LoRA changed nothing"
        );
        let mut args = lora.clone();
        args.extend(streaming_args(budget, 1));
        let (run, image) = sd_cli(model, "sd-cli", &dir(mode), &args);
        assert!(run.success(), "{mode}: {}", run.stderr);
        assert_eq!(
            png(&image),
            png(&reference_png),
            "{mode}: the image differs"
        );
        assert!(
            run.stderr
                .lines()
                .any(|l| l.starts_with("offload-engine: unet:")
                    && !l.contains(" 0 streamed layers")
                    && l.contains(" streamed layers")),
            "{mode}: nothing streamed:\n{}",
            run.stderr
        );
    }
}

#[test]
fn two_images_in_one_process_and_a_budget_too_small() {
    let batch = ["-b".to_string(), "2".into()];
    let (reference, _) = sd_cli(
        &SD1_TINY,
        "sd-cli-unpatched",
        &scratch("batch-reference"),
        &batch,
    );
    assert!(reference.success(), "{}", reference.stderr);
    let (roomy, _) = sd_cli(
        &SD1_TINY,
        "sd-cli",
        &scratch("batch-roomy"),
        &streaming_args(64 << 30, 1),
    );
    let sizes = sizes(&roomy.stderr, "unet");
    let mut args = streaming_args(sizes.two_slots(), 1);
    args.extend(batch.iter().cloned());
    let dir = scratch("batch-streamed");
    let (run, _) = sd_cli(&SD1_TINY, "sd-cli", &dir, &args);
    assert!(run.success(), "{}", run.stderr);
    for i in 0..2 {
        let name = format!("out_{i}.png");
        let ours = png(&dir.join(&name));
        let theirs = png(&scratch("batch-reference").join(&name));
        assert_eq!(ours, theirs, "image {i} of the batch");
    }

    // Below the global tensors plus one slot: the planner's message, no image, no crash.
    let dir = scratch("too-small");
    let (run, image) = sd_cli(
        &SD1_TINY,
        "sd-cli",
        &dir,
        &streaming_args(sizes.global / 2, 1),
    );
    assert_stopped(&run, &image, &["insufficient device memory", "--max-vram"]);
}

/// sd-cli stopped with exit status 1 (not a signal), saying each of `said`, and wrote no image.
fn assert_stopped(run: &common::Finished, image: &Path, said: &[&str]) {
    assert_eq!(
        run.status.and_then(|s| s.code()),
        Some(1),
        "not a clean exit (a signal, or no status): {}",
        run.stderr
    );
    for words in said {
        assert!(
            run.stderr.contains(words),
            "no {words:?} in\n{}",
            run.stderr
        );
    }
    assert!(!image.exists(), "an image was written");
}

/// A host that keeps its models loaded between jobs (free_params_immediately off, as
/// sd-server runs): the text encoder's engine lives on while the UNet streams, and the
/// pipeline keeps both within the one budget, moving the one not running off the device
/// when the other needs the room. Four jobs, the second with a LoRA merged into the weights
/// the engines hold (sd.cpp's "immediately" mode) and the third taking it out again; each
/// image is identical to sd.cpp's own.
#[test]
fn jobs_in_a_host_that_keeps_its_models_share_one_budget() {
    let b = build();
    let model = &SD1_TINY;
    let jobs = |name: &str, count: usize, budget: Option<u64>| {
        let dir = scratch(&format!("jobs/{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new(b.bin.join("sd-jobs"));
        command
            .arg(b.models.join(format!("{}.gguf", model.name)))
            .arg(b.models.join(model.tae))
            .arg(b.models.join("loras/sd1-tiny-lora.gguf"))
            .arg(&dir)
            .arg(count.to_string());
        if let Some(budget) = budget {
            command.arg(gib(budget));
        }
        let finished = common::execute_ok(
            &format!("sd-jobs {name}"),
            &mut command,
            &dir.join("logs"),
            Some(RUN_TIMEOUT),
        );
        let images: Vec<Vec<u8>> = (0..count)
            .map(|j| png(&dir.join(format!("job{j}.rgb"))))
            .collect();
        (finished.stderr, images)
    };
    let (_, expected) = jobs("reference", 4, None);
    assert_ne!(expected[0], expected[1], "the LoRA changed nothing");
    // One job is enough for the sizes the budget is made from.
    let (roomy, _) = jobs("roomy", 1, Some(64 << 30));
    let budget = sizes(&roomy, model.runner).half();
    let (stderr, images) = jobs("half", 4, Some(budget));
    assert_eq!(images, expected, "the streamed jobs' images differ");
    // "pipeline budget B B, peak P B, L loads, U unloads", last as the components are freed.
    let figures = stderr
        .lines()
        .rev()
        .find_map(|l| l.split("pipeline budget ").nth(1))
        .unwrap_or_else(|| panic!("no pipeline figures in\n{stderr}"));
    let numbers: Vec<u64> = figures
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| !n.is_empty())
        .map(|n| n.parse().unwrap())
        .collect();
    let [pipeline_budget, peak, loads, unloads] = numbers[..] else {
        panic!("not four figures: {figures}");
    };
    // sd.cpp holds --max-vram as a float of GiB.
    assert!(
        pipeline_budget.abs_diff(budget) < 1024,
        "{figures} for {budget} B"
    );
    assert!(peak <= pipeline_budget, "{figures}");
    // The last two jobs ran on the same engines: CLIP and the UNet placed twice each, each
    // moved off for the other.
    assert!(
        loads >= 4 && unloads >= 3,
        "the engines did not live on between jobs: {figures}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("offload-engine: clip:"))
            && stderr
                .lines()
                .any(|l| l.starts_with("offload-engine: unet: placed streaming")),
        "{stderr}"
    );
}

/// `offload-engine: <runner>: ... K weights (F, B B, read from the model file); ...`: K, F, B.
fn weights_from_file(stderr: &str, runner: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("offload-engine: {runner}:")) && l.contains(" weights ("))
        .unwrap_or_else(|| panic!("no plan line for {runner} in\n{stderr}"));
    let numbers: Vec<u64> = line[line.find(" layers, ").expect("layers") + 9..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(3)
        .map(|s| s.parse().unwrap())
        .collect();
    (numbers[0], numbers[1], numbers[2])
}

/// The disk tier (`--stream-from-file`): sd.cpp's loader leaves the runners' weights in the
/// model file and the engines read them from there whenever they place them, so the process
/// holds no copy of the model. For each model the PNG is the unpatched sd-cli's at the global
/// tensors plus two slots (SD 1.x: prefetch depths 0, 1 and 2, and half the UNet too); every
/// weight of the diffusion model comes from the file, and the peak resident set is below the
/// same streamed run's with the weights in memory by at least 80% of the diffusion model's
/// weights. A model file cut short is refused with its name and the range, exit status 1, no
/// image.
#[test]
fn weights_left_in_the_model_file_stream_with_the_unpatched_image_in_less_memory() {
    let sd1 = streams_from_the_model_file(&SD1_TINY, &[0, 1, 2], true);
    streams_from_the_model_file(&FLUX_TINY, &[1], false);
    refuses_a_model_file_cut_short(&SD1_TINY, sd1.two_slots());
}

/// Returns the diffusion runner's sizes.
fn streams_from_the_model_file(model: &Model, depths: &[u32], half_too: bool) -> Sizes {
    let dir = |name: &str| scratch(&format!("from-file/{}/{name}", model.name));
    let (reference, reference_png) = sd_cli(model, "sd-cli-unpatched", &dir("reference"), &[]);
    assert!(reference.success(), "{}", reference.stderr);
    let expected = png(&reference_png);
    let (roomy, _) = sd_cli(model, "sd-cli", &dir("roomy"), &streaming_args(64 << 30, 1));
    assert!(roomy.success(), "{}", roomy.stderr);
    let sizes = sizes(&roomy.stderr, model.runner);
    let (two_slots, weight_bytes) = (sizes.two_slots(), sizes.global + sizes.layers);
    let (in_memory, image) = sd_cli(
        model,
        "sd-cli",
        &dir("in-memory"),
        &streaming_args(two_slots, 1),
    );
    assert!(in_memory.success(), "{}", in_memory.stderr);
    assert_eq!(png(&image), expected, "weights in memory");
    assert_eq!(weights_from_file(&in_memory.stderr, model.runner).1, 0);

    let budgets: &[(&str, u64, &[u32])] = if half_too {
        &[
            ("two-slots", two_slots, depths),
            ("half", sizes.half(), &[1]),
        ]
    } else {
        &[("two-slots", two_slots, depths)]
    };
    for &(name, budget, depths) in budgets {
        for &depth in depths {
            let what = format!("from the file, {name} ({budget} B), prefetch depth {depth}");
            let mut args = streaming_args(budget, depth);
            args.push("--stream-from-file".into());
            let (run, image) = sd_cli(model, "sd-cli", &dir(&format!("{name}-{depth}")), &args);
            let what = format!("{}: {what}", model.name);
            assert!(run.success(), "{what}:\n{}", run.stderr);
            assert_eq!(png(&image), expected, "{what}: the image differs");
            let (weights, from_file, from_file_bytes) =
                weights_from_file(&run.stderr, model.runner);
            assert_eq!(
                from_file, weights,
                "{what}: not every weight of the diffusion model came from the file"
            );
            assert!(
                from_file_bytes * 10 >= weight_bytes * 9 && from_file_bytes <= weight_bytes,
                "{what}: {from_file_bytes} B from the file of {weight_bytes} B"
            );
            assert_traffic_agrees(&run.stderr, model.runner, &what);
            if name == "two-slots" && depth == 1 {
                let saved = in_memory.peak_rss_bytes.saturating_sub(run.peak_rss_bytes);
                eprintln!(
                    "{}: peak RSS: weights in memory {} B, in the file {} B; the diffusion model's weights {from_file_bytes} B",
                    model.name, in_memory.peak_rss_bytes, run.peak_rss_bytes
                );
                assert!(
                    saved * 10 >= from_file_bytes * 8,
                    "{what}: peak RSS {} B against {} B with the weights in memory: less than 80% of the diffusion model's {from_file_bytes} B saved",
                    run.peak_rss_bytes,
                    in_memory.peak_rss_bytes
                );
            }
        }
    }
    sizes
}

/// A model file cut short: the range outside it is refused before anything runs from it.
fn refuses_a_model_file_cut_short(model: &Model, budget: u64) {
    let short = scratch("from-file/short");
    std::fs::create_dir_all(&short).unwrap();
    let cut = short.join(format!("{}.gguf", model.name));
    std::fs::copy(build().models.join(format!("{}.gguf", model.name)), &cut).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    let length = file.metadata().unwrap().len();
    file.set_len(length * 7 / 10).unwrap();
    let mut args = streaming_args(budget, 1);
    args.push("--stream-from-file".into());
    let (run, image) = sd_cli_on(model, &cut, "sd-cli", &short, &args);
    assert_stopped(&run, &image, &["lie outside", &cut.display().to_string()]);
}
