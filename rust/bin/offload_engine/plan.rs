//! `offload-engine plan`: what stays on the device and what streams, for a GGUF file or a
//! set of transformer hyperparameters.

use std::path::PathBuf;

use crate::inspect::load_registry;
use offload_engine::error::{Error, Result};
use offload_engine::planner::{self, Budget, Hparams, Link, Workload};
use offload_engine::units::format_bytes;

pub struct PlanArgs {
    pub model: Option<PathBuf>,
    pub hparams: Option<String>,
    pub vram: Option<u64>,
    pub free_vram: Option<u64>,
    pub link: String,
    pub workload: Workload,
    pub pattern: Option<String>,
    pub json: bool,
}

pub fn plan(args: PlanArgs) -> Result<()> {
    let cost = match (&args.model, &args.hparams) {
        (Some(path), None) => load_registry(path, args.pattern.as_deref())?.model_cost(),
        (None, Some(spec)) => Hparams::parse(spec)?.to_model_cost(),
        _ => {
            return Err(Error::invalid(
                "give a MODEL.gguf or --hparams (one of them)",
            ))
        }
    };
    let free = match (args.vram, args.free_vram) {
        (Some(v), None) | (None, Some(v)) => v,
        _ => {
            return Err(Error::invalid(
                "give --vram SIZE or --free-vram SIZE (one of them)",
            ))
        }
    };
    let mut budget = Budget::from_free(free);
    budget.total_bytes = free;
    let link = match args.link.parse::<f64>() {
        Ok(gbps) => Link::from_gbps(gbps)?,
        Err(_) => Link::named(&args.link)?,
    };
    let plan = planner::plan(&cost, &budget, &args.workload, &link)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&plan).map_err(|e| Error::invalid(e.to_string()))?
        );
    } else {
        println!("mode:                {}", plan.mode.as_str());
        println!(
            "layers:              {} resident, {} streamed",
            plan.resident_layers.len(),
            plan.streamed_layers.len()
        );
        println!(
            "slots:               {} x {}",
            plan.slot_count,
            format_bytes(plan.slot_bytes)
        );
        println!(
            "full cache needs:    {}",
            format_bytes(plan.full_cache_bytes)
        );
        println!(
            "streaming needs:     {}",
            format_bytes(plan.streaming_bytes)
        );
        println!("usable:              {}", format_bytes(plan.usable_bytes));
        println!(
            "largest layer:       {}",
            format_bytes(plan.layer_bytes_max)
        );
        println!("moved per step:      {}", format_bytes(plan.bytes_per_step));
        println!("moved per run:       {}", format_bytes(plan.bytes_per_run));
        println!(
            "predicted step:      {:.3} s over {}",
            plan.predicted_step_seconds,
            link.describe()
        );
        println!("{}", planner::memory_bar(&plan, &budget, 60));
        println!("{}", plan.message);
    }
    if plan.mode == planner::Mode::Insufficient {
        return Err(Error::new(
            offload_engine::error::Status::InsufficientMemory,
            plan.message,
        ));
    }
    Ok(())
}
