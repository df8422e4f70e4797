//! `offload-engine inspect`: a GGUF model's layers in execution order.

use std::path::{Path, PathBuf};

use crate::args::count;
use offload_engine::error::Result;
use offload_engine::registry::Registry;
use offload_engine::units::format_bytes;

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The GGUF model file.
    pub model: PathBuf,
    /// Built-in pattern name or a regex with one capture group for the layer index.
    #[arg(long)]
    pub pattern: Option<String>,
    /// List the always-resident (global) tensors with their sizes.
    #[arg(long)]
    pub global: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A GGUF file's tensors, grouped (descriptors only: no weights are read).
pub fn load_registry(model: &Path, pattern: Option<&str>) -> Result<Registry> {
    let pattern = pattern.map(Registry::pattern_from_arg).transpose()?;
    let mut registry = Registry::new(pattern);
    registry.add_gguf(model)?;
    registry.finalize();
    Ok(registry)
}

pub fn inspect(args: &InspectArgs) -> Result<()> {
    let model = &args.model;
    let mut registry = load_registry(model, args.pattern.as_deref())?;
    // What the file calls itself, beside the layer pattern that grouped it.
    let file_architecture = offload_engine::gguf::read_path(model)?
        .architecture()
        .unwrap_or("(not set)")
        .to_string();
    let pattern = registry.architecture();
    let global_bytes = registry.global_bytes();
    let global: Vec<(String, String, u64)> = registry
        .global_tensors()
        .to_vec()
        .iter()
        .filter_map(|&id| registry.tensor(id).ok())
        .map(|t| {
            (
                t.name.to_string(),
                offload_engine::gguf::type_name(t.ggml_type).to_string(),
                t.bytes,
            )
        })
        .collect();
    let total = registry.total_bytes();
    let tensors = registry.tensor_count();
    let layers = registry.layers().to_vec();
    // A pattern that does not fit leaves most tensor *names* unmatched; a large embedding
    // alone (most of the bytes, two names) is no sign of that.
    let unmatched_warning = (tensors > 0 && global.len() * 2 > tensors).then(|| {
        format!(
            "{} of {} tensors matched no layer: check the pattern (--pattern)",
            global.len(),
            tensors
        )
    });
    if args.json {
        let mut doc = serde_json::json!({
            "architecture": file_architecture,
            "pattern": pattern,
            "layers": layers.iter().map(|l| serde_json::json!({
                "name": l.name, "component": l.component.as_str(), "tensors": l.tensors.len(), "bytes": l.bytes
            })).collect::<Vec<_>>(),
            "global_bytes": global_bytes,
            "global_tensors": global.len(),
            "total_bytes": total,
            "tensor_count": tensors,
            "warning": unmatched_warning,
        });
        if args.global {
            doc["global"] = global
                .iter()
                .map(|(name, ty, bytes)| serde_json::json!({"name": name, "type": ty, "bytes": bytes}))
                .collect();
        }
        println!("{doc}");
        return Ok(());
    }
    println!("model:        {}", model.display());
    println!("architecture: {file_architecture} (layer pattern {pattern})");
    println!();
    println!(
        "{:>5}  {:<28} {:<16} {:>8} {:>12}",
        "index", "layer", "component", "tensors", "bytes"
    );
    for (i, l) in layers.iter().enumerate() {
        println!(
            "{:>5}  {:<28} {:<16} {:>8} {:>12}",
            i,
            l.name,
            l.component.as_str(),
            l.tensors.len(),
            format_bytes(l.bytes)
        );
    }
    println!(
        "{:>5}  {:<28} {:<16} {:>8} {:>12}",
        "-",
        "(global)",
        "",
        global.len(),
        format_bytes(global_bytes)
    );
    if args.global {
        println!();
        println!("always resident:");
        for (name, ty, bytes) in &global {
            println!("       {name:<44} {ty:<8} {:>12}", format_bytes(*bytes));
        }
    }
    println!();
    println!(
        "{}, {}, {} total; global group {} ({:.1}%)",
        count(layers.len() as u64, "layer"),
        count(tensors as u64, "tensor"),
        format_bytes(total),
        format_bytes(global_bytes),
        if total > 0 {
            100.0 * global_bytes as f64 / total as f64
        } else {
            0.0
        },
    );
    if let Some(warning) = unmatched_warning {
        println!("warning: {warning}");
    }
    Ok(())
}
