//! Byte sizes for people: formatting and parsing ("12GiB", "512M", "1.5G", "4096").

use crate::error::{Error, Result};

const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// Formats with binary units and two decimals above bytes: `1.50 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Parses a size; suffixes K/M/G/T (optionally followed by `iB` or `B`) are binary multiples.
pub fn parse_size(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        Error::invalid(format!(
            "size {text:?}: expected a number with an optional unit"
        ))
    })?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(Error::invalid(format!(
                "size {text:?}: unknown unit {other:?}"
            )))
        }
    };
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes.round() < 1.0 || bytes >= u64::MAX as f64 {
        return Err(Error::invalid(format!(
            "size {text:?} must be positive and finite"
        )));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(12 << 30), "12.00 GiB");
    }

    #[test]
    fn parses_units_and_rejects_nonsense() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2 gb").unwrap(), 2 << 30);
        for bad in ["", "0", "-1G", "12 parsecs", "G", "1e400"] {
            let err = parse_size(bad).unwrap_err();
            assert_eq!(err.status, crate::error::Status::InvalidArgument, "{bad}");
        }
    }
}
