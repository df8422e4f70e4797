//! `offload-engine soak`: many engines with random budgets, prefetch depths and layer sizes;
//! every output must equal its resident reference, the arena must stay within the plan, and
//! memory and thread counts must stay flat.

use crate::models::{run_reference, run_with_engine, Architecture, DemoConfig, DemoModel};
use offload_engine::engine::EngineParams;
use offload_engine::error::{Error, Result, Status};
use offload_engine::planner::Workload;
use offload_engine::units::format_bytes;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SoakReport {
    pub engines: u64,
    pub passes: u64,
    pub mismatches: u64,
    pub refused_budgets: u64,
    pub arena_overruns: u64,
    pub rss_after_first_tenth_bytes: u64,
    pub rss_at_end_bytes: u64,
    pub threads_after_first_tenth: u64,
    pub threads_at_end: u64,
}

/// Resident set size and thread count of this process (Linux /proc; zeros elsewhere).
pub fn process_figures() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:") * 1024, field("Threads:"))
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub fn run_soak(engines: u64, passes_per_engine: u64, seed: u64) -> Result<SoakReport> {
    let mut rng = Rng(seed | 1);
    let backend = offload_engine::backend::Device::select(Some("CPU"))?.init_backend()?;
    backend.set_threads(1);
    let mut report = SoakReport::default();
    for round in 0..engines {
        let architecture = if rng.below(2) == 0 {
            Architecture::Llama
        } else {
            Architecture::Flux
        };
        let heads = 4;
        let config = DemoConfig {
            architecture,
            hidden: 16 * (2 + rng.below(4) as i64),
            heads,
            ffn: 16 * (2 + rng.below(8) as i64),
            layers: 2 + rng.below(6) as usize,
            vocab: 64,
            tokens: 1 + rng.below(4) as i64,
            seed: rng.next(),
            matrix_type: offload_engine::ggml::GGML_TYPE_F16,
        };
        let model = DemoModel::new(config)?;
        let reference = run_reference(&model, &backend, 1)?;
        let weights = model.weight_bytes();
        let budget = weights / 8 + rng.below(weights * 2);
        let depth = rng.below(4) as u32;
        let params = EngineParams {
            device: Some("CPU".into()),
            budget_bytes: Some(budget.max(1)),
            prefetch_depth: depth,
            ..Default::default()
        };
        let workload = Workload {
            steps: passes_per_engine as u32,
            passes_per_step: 1,
            prefetch_depth: depth,
            ..Default::default()
        };
        report.engines += 1;
        match run_with_engine(&model, params, &workload, passes_per_engine as usize, None) {
            Ok(run) => {
                report.passes += run.pass_seconds.len() as u64;
                if run.output != reference {
                    report.mismatches += 1;
                }
                if run.stats.arena_peak_bytes > run.stats.arena_bytes
                    || run.plan.arena_bytes > budget.max(1)
                {
                    report.arena_overruns += 1;
                }
            }
            Err(err) if err.status == Status::InsufficientMemory => report.refused_budgets += 1,
            Err(err) => return Err(err),
        }
        if round + 1 == (engines / 10).max(1) {
            (
                report.rss_after_first_tenth_bytes,
                report.threads_after_first_tenth,
            ) = process_figures();
        }
    }
    (report.rss_at_end_bytes, report.threads_at_end) = process_figures();
    if report.mismatches > 0 || report.arena_overruns > 0 {
        return Err(Error::new(
            Status::Internal,
            format!("soak failed: {report:?}"),
        ));
    }
    Ok(report)
}

#[derive(clap::Args)]
pub struct SoakArgs {
    /// Engines to create, one after another.
    #[arg(long, default_value_t = 300)]
    pub engines: u64,
    /// Forward passes per engine.
    #[arg(long, default_value_t = 10)]
    pub passes: u64,
    /// Seed of the random budgets, depths and sizes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `offload-engine soak`: prints the report, or its JSON.
pub fn soak(args: &SoakArgs) -> Result<()> {
    let json = args.json;
    let r = run_soak(args.engines, args.passes, args.seed)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| Error::invalid(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "{} engines, {} passes, {} budgets refused as insufficient: {} output mismatches, {} arena overruns",
        r.engines, r.passes, r.refused_budgets, r.mismatches, r.arena_overruns
    );
    println!(
        "resident memory {} after the first tenth, {} at the end; threads {} then {}",
        format_bytes(r.rss_after_first_tenth_bytes),
        format_bytes(r.rss_at_end_bytes),
        r.threads_after_first_tenth,
        r.threads_at_end
    );
    Ok(())
}
