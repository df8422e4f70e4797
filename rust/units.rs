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

/// Parses a size as people write it: a number with an optional unit. Decimal units are
/// powers of ten and binary ones powers of two, as users read them: K/KB = 10^3, M/MB = 10^6,
/// G/GB = 10^9, T/TB = 10^12; KiB = 2^10, MiB = 2^20, GiB = 2^30, TiB = 2^40; a bare number
/// (or B) is bytes. Case does not matter, blanks before the unit are allowed. Zero is a size
/// ("0", "0MiB"); a positive number that rounds to no bytes at all ("0.4") is an error.
pub fn parse_size(text: &str) -> Result<u64> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        Error::invalid(format!(
            "size {text:?}: expected a number with an optional unit (e.g. 512MiB, 12GB, 4096)"
        ))
    })?;
    let unit: f64 = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => (1u64 << 20) as f64,
        "gib" => (1u64 << 30) as f64,
        "tib" => (1u64 << 40) as f64,
        other => {
            return Err(Error::invalid(format!(
                "size {text:?}: unknown unit {other:?} (B, KB/KiB, MB/MiB, GB/GiB, TB/TiB)"
            )))
        }
    };
    let bytes = value * unit;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(Error::invalid(format!("size {text:?} is too large")));
    }
    if value > 0.0 && bytes.round() < 1.0 {
        return Err(Error::invalid(format!("size {text:?} rounds to 0 bytes")));
    }
    Ok(bytes.round() as u64)
}

/// A warning for a memory size given as a bare number below 1 MiB, which is almost certainly
/// meant in a unit ("--free-vram 12" is 12 bytes); `None` for anything else.
pub fn bare_size_warning(text: &str, bytes: u64) -> Option<String> {
    let bare = text.trim().chars().all(|c| c.is_ascii_digit() || c == '.');
    (bare && bytes > 0 && bytes < 1 << 20).then(|| {
        format!(
            "size {:?} means {bytes} bytes; give a unit if you meant more (e.g. {}MiB or {}GB)",
            text.trim(),
            text.trim(),
            text.trim()
        )
    })
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
    fn parses_decimal_and_binary_units_as_people_read_them() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512_000_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("12 GB").unwrap(), 12_000_000_000);
        assert_eq!(parse_size("12g").unwrap(), 12_000_000_000);
        assert_eq!(parse_size("2 gib").unwrap(), 2 << 30);
        assert_eq!(parse_size("1KB").unwrap(), 1000);
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("0MiB").unwrap(), 0);
        for bad in ["", "-1G", "12 parsecs", "G", "1e400", "0.4", "1..2M"] {
            let err = parse_size(bad).unwrap_err();
            assert_eq!(err.status, crate::error::Status::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn warns_about_bare_numbers_below_a_mebibyte() {
        assert!(bare_size_warning("12", 12).unwrap().contains("12 bytes"));
        assert!(bare_size_warning("1048575", 1_048_575).is_some());
        assert!(bare_size_warning("1048576", 1 << 20).is_none());
        assert!(bare_size_warning("12K", 12_000).is_none());
        assert!(bare_size_warning("0", 0).is_none());
    }
}
