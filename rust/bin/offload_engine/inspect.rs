//! `offload-engine inspect`: a GGUF model's layers in execution order.

use offload_engine::error::Result;
use offload_engine::registry::Registry;
use offload_engine::units::format_bytes;

/// A GGUF file's tensors, grouped (descriptors only: no weights are read).
pub fn load_registry(model: &std::path::Path, pattern: Option<&str>) -> Result<Registry> {
    let pattern = pattern.map(Registry::pattern_from_arg).transpose()?;
    let mut registry = Registry::new(pattern);
    registry.add_gguf(model)?;
    registry.finalize();
    Ok(registry)
}

pub fn inspect(model: &std::path::Path, pattern: Option<&str>, json: bool) -> Result<()> {
    let mut registry = load_registry(model, pattern)?;
    let architecture = registry.architecture();
    let global_bytes = registry.global_bytes();
    let global_count = registry.global_tensors().len();
    let total = registry.total_bytes();
    let count = registry.tensor_count();
    let layers = registry.layers().to_vec();
    if json {
        let doc = serde_json::json!({
            "architecture": architecture,
            "layers": layers.iter().map(|l| serde_json::json!({
                "name": l.name, "component": l.component.as_str(), "tensors": l.tensors.len(), "bytes": l.bytes
            })).collect::<Vec<_>>(),
            "global_bytes": global_bytes,
            "global_tensors": global_count,
            "total_bytes": total,
            "tensor_count": count,
        });
        println!("{doc}");
        return Ok(());
    }
    println!("model:        {}", model.display());
    println!("architecture: {architecture}");
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
        global_count,
        format_bytes(global_bytes)
    );
    println!();
    println!(
        "{} layers, {} tensors, {} total; global group {} ({:.1}%){}",
        layers.len(),
        count,
        format_bytes(total),
        format_bytes(global_bytes),
        if total > 0 {
            100.0 * global_bytes as f64 / total as f64
        } else {
            0.0
        },
        if total > 0 && global_bytes * 2 > total {
            " -- more than half is unmatched: check the pattern"
        } else {
            ""
        }
    );
    Ok(())
}
