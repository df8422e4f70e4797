//! What the subcommands share on the command line: sizes in one syntax, plural words.

use offload_engine::units::{bare_size_warning, parse_size};

/// A memory size (`512MiB`, `12GB`, `4096`): see `units::parse_size`. A bare number below
/// 1 MiB is accepted with a warning, since it almost certainly lacks a unit.
pub fn size(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text).map_err(|e| e.message)?;
    if let Some(warning) = bare_size_warning(text, bytes) {
        eprintln!("offload-engine: warning: {warning}");
    }
    Ok(bytes)
}

/// "1 layer", "3 layers", "2 passes".
pub fn count(n: impl Into<u64>, word: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("1 {word}")
    } else if word.ends_with('s') {
        format!("{n} {word}es")
    } else {
        format!("{n} {word}s")
    }
}
