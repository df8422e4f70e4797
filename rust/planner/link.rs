//! Host links that weights cross on their way to the device, and the stream-or-CPU advice for
//! bytes that do not fit.
//!
//! Bandwidths are *effective* figures (what a bulk copy of a few hundred MiB sustains), not the
//! signalling rate printed on the box: planning with theoretical numbers would promise step times
//! that never happen. Where a measured figure exists it is given next to the entry.

use serde::Serialize;

use crate::error::{Error, Result};

const GB: f64 = 1e9;

/// One row of the built-in link table.
#[derive(Debug, Clone, Serialize)]
pub struct LinkSpec {
    pub name: &'static str,
    /// Effective bulk-copy bandwidth, in GB/s (10^9 bytes per second).
    pub gb_per_s: f64,
    /// Fixed cost of starting one transfer (one layer), in microseconds.
    pub latency_us: f64,
    /// Where the figure comes from.
    pub note: &'static str,
}

/// The built-in table, slowest first.
static LINKS: [LinkSpec; 10] = [
    LinkSpec {
        name: "usb2",
        gb_per_s: 0.035,
        latency_us: 1000.0,
        note: "USB 2.0 high speed: 480 Mb/s signalling, ~35 MB/s sustained bulk; ~1 ms per \
               request round trip: too slow to stream weights over.",
    },
    LinkSpec {
        name: "pcie2-x4",
        gb_per_s: 1.7,
        latency_us: 10.0,
        note: "PCIe 2.0 x4: 2 GB/s raw after 8b/10b; 1.6-1.8 GB/s effective as measured, \
               on par with a single-chip DDR3 board memory.",
    },
    LinkSpec {
        name: "pcie3-x16",
        gb_per_s: 12.0,
        latency_us: 10.0,
        note: "PCIe 3.0 x16: 15.75 GB/s raw, ~12 GB/s from pinned memory. A layer-streaming run \
               on such a board (RTX 3060) saw only ~3.5 GB/s during streaming windows: pageable source \
               memory and per-layer overheads cost the rest; calibrate with a measured link.",
    },
    LinkSpec {
        name: "pcie4-x16",
        gb_per_s: 24.0,
        latency_us: 10.0,
        note: "PCIe 4.0 x16: 31.5 GB/s raw (~32 GB/s as usually quoted), ~24 GB/s \
               practical.",
    },
    LinkSpec {
        name: "pcie5-x16",
        gb_per_s: 48.0,
        latency_us: 10.0,
        note: "PCIe 5.0 x16: 63 GB/s raw, ~48 GB/s assumed effective (same ratio as PCIe 4).",
    },
    LinkSpec {
        name: "nvme",
        gb_per_s: 3.5,
        latency_us: 100.0,
        note: "NVMe SSD sequential read: ~3.5 GB/s for PCIe 3 x4 drives, up to ~7 for PCIe 4; \
               ~100 us per request. The lower figure is used.",
    },
    LinkSpec {
        name: "ddr3",
        gb_per_s: 17.0,
        latency_us: 0.1,
        note: "Dual-channel DDR3-1600: 25.6 GB/s peak, ~17 GB/s sustained.",
    },
    LinkSpec {
        name: "ddr4",
        gb_per_s: 35.0,
        latency_us: 0.1,
        note: "Dual-channel DDR4-3200: 51.2 GB/s peak, ~35 GB/s sustained.",
    },
    LinkSpec {
        name: "ddr5",
        gb_per_s: 60.0,
        latency_us: 0.1,
        note: "Dual-channel DDR5-5600: 89.6 GB/s peak, ~60 GB/s sustained; faster than any \
               PCIe 4 link, which is what decides decode.",
    },
    LinkSpec {
        name: "unified",
        gb_per_s: 100.0,
        latency_us: 0.0,
        note: "Unified memory: no copy at all; 'streaming' costs one read at memory bandwidth \
               (~100 GB/s assumed) and no per-transfer latency.",
    },
];

/// A host-to-device link as the planner sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    pub name: String,
    pub bandwidth_bytes_per_s: f64,
    pub latency_s: f64,
    /// True when the figures came from a measurement on this machine rather than the table.
    pub measured: bool,
}

impl Link {
    /// A link from the built-in table (case-insensitive; `_` and `-` are interchangeable).
    pub fn named(name: &str) -> Result<Link> {
        let wanted = name.trim().to_ascii_lowercase().replace('_', "-");
        LINKS
            .iter()
            .find(|spec| spec.name == wanted)
            .map(|spec| Link {
                name: spec.name.to_string(),
                bandwidth_bytes_per_s: spec.gb_per_s * GB,
                latency_s: spec.latency_us * 1e-6,
                measured: false,
            })
            .ok_or_else(|| {
                let known: Vec<&str> = LINKS.iter().map(|s| s.name).collect();
                Error::invalid(format!(
                    "unknown link {name:?}; known links: {}",
                    known.join(", ")
                ))
            })
    }

    /// A user-given bandwidth in GB/s (10^9 bytes/s) with PCIe-like latency (10 us).
    pub fn from_gbps(gb_per_s: f64) -> Result<Link> {
        let link = Link {
            name: format!("custom-{gb_per_s}GB/s"),
            bandwidth_bytes_per_s: gb_per_s * GB,
            latency_s: 10e-6,
            measured: false,
        };
        link.validate()?;
        Ok(link)
    }

    /// A link whose figures were measured on this machine (e.g. by timing a pinned upload).
    pub fn from_measurement(bandwidth_bytes_per_s: f64, latency_s: f64) -> Result<Link> {
        let link = Link {
            name: "measured".to_string(),
            bandwidth_bytes_per_s,
            latency_s,
            measured: true,
        };
        link.validate()?;
        Ok(link)
    }

    /// The built-in table.
    pub fn table() -> &'static [LinkSpec] {
        &LINKS
    }

    /// Rejects figures that would make a time estimate meaningless (zero, negative, NaN, inf).
    pub fn validate(&self) -> Result<()> {
        let bw = self.bandwidth_bytes_per_s;
        if !(bw.is_finite() && bw > 0.0) {
            return Err(Error::invalid(format!(
                "link {:?}: bandwidth must be a positive finite number of bytes per second, got {bw}",
                self.name
            )));
        }
        if !(self.latency_s.is_finite() && self.latency_s >= 0.0) {
            return Err(Error::invalid(format!(
                "link {:?}: latency must be finite and non-negative, got {}",
                self.name, self.latency_s
            )));
        }
        Ok(())
    }

    /// Seconds to move `bytes` in one transfer.
    pub fn transfer_seconds(&self, bytes: u64) -> f64 {
        if bytes == 0 {
            0.0
        } else {
            self.latency_s + bytes as f64 / self.bandwidth_bytes_per_s
        }
    }

    /// "pcie4-x16 (table value, 24.0 GB/s)" / "measured (measured, 3.5 GB/s)".
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {:.3} GB/s, {:.1} us per transfer)",
            self.name,
            if self.measured {
                "measured"
            } else {
                "table value"
            },
            self.bandwidth_bytes_per_s / GB,
            self.latency_s * 1e6
        )
    }
}

/// What limits the work on the overflowing weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Regime {
    /// Each weight is used for a few flops (batch-1 decode): memory bandwidth decides.
    BandwidthBound,
    /// Each weight is reused across many tokens/pixels (prefill, diffusion): flops decide.
    ComputeBound,
}

/// Stream the overflow to the device, or compute it on the CPU where it already is?
#[derive(Debug, Clone, Serialize)]
pub struct Advice {
    /// "stream" or "cpu".
    pub prefer: &'static str,
    pub stream_seconds: f64,
    pub cpu_seconds: f64,
    pub reason: String,
}

/// Compares, for `overflow_bytes` of weights that do not fit on the device, one pass of
///
/// * streaming: `bytes / link bandwidth + latency + flops / device_flops` (no overlap assumed:
///   the conservative side; the plan's pipeline model overlaps copies with other layers), and
/// * CPU: `max(bytes / host memory bandwidth, flops / host_flops)` (roofline),
///
/// where `flops = overflow_bytes * flops_per_byte`. The argument in numbers: a PCIe 4.0
/// x16 link (~32 GB/s raw, ~24 effective) is slower than dual-channel DDR5 (~60 GB/s), so for
/// bandwidth-bound decode the CPU reading its own RAM wins; prefill and diffusion reuse each
/// weight thousands of times, so the device's flops win and streaming pays off.
pub fn advise(
    overflow_bytes: u64,
    link: &Link,
    host_memory_bandwidth: f64,
    host_flops: f64,
    device_flops: f64,
    flops_per_byte: f64,
    regime: Regime,
) -> Result<Advice> {
    link.validate()?;
    for (what, value) in [
        ("host memory bandwidth", host_memory_bandwidth),
        ("host flops", host_flops),
        ("device flops", device_flops),
    ] {
        if !(value.is_finite() && value > 0.0) {
            return Err(Error::invalid(format!(
                "advise: {what} must be positive and finite, got {value}"
            )));
        }
    }
    if !(flops_per_byte.is_finite() && flops_per_byte >= 0.0) {
        return Err(Error::invalid(format!(
            "advise: flops per byte must be finite and non-negative, got {flops_per_byte}"
        )));
    }
    let bytes = overflow_bytes as f64;
    let flops = bytes * flops_per_byte;
    let copy = link.transfer_seconds(overflow_bytes);
    let stream_seconds = copy + flops / device_flops;
    let cpu_read = bytes / host_memory_bandwidth;
    let cpu_math = flops / host_flops;
    let cpu_seconds = cpu_read.max(cpu_math);
    let prefer = if stream_seconds <= cpu_seconds {
        "stream"
    } else {
        "cpu"
    };
    let regime_text = match regime {
        Regime::BandwidthBound => {
            "bandwidth-bound (few flops per weight byte, e.g. batch-1 decode)"
        }
        Regime::ComputeBound => {
            "compute-bound (weights reused many times, e.g. prefill, diffusion)"
        }
    };
    let cpu_limit = if cpu_math > cpu_read {
        "its flops"
    } else {
        "its memory bandwidth"
    };
    let reason = format!(
        "{regime_text}: streaming {} over {} takes {:.4} s copy + {:.4} s device compute = {:.4} s; \
         the CPU, limited by {cpu_limit}, takes {:.4} s; prefer {prefer}",
        crate::units::format_bytes(overflow_bytes),
        link.describe(),
        copy,
        flops / device_flops,
        stream_seconds,
        cpu_seconds,
    );
    Ok(Advice {
        prefer,
        stream_seconds,
        cpu_seconds,
        reason,
    })
}

/// Language-model inputs of `advise`: the host's and the device's speeds.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Host memory bandwidth in bytes per second (the CPU reads overflowing weights there).
    pub host_memory_bandwidth: f64,
    /// Host compute in flops per second (quantized matrix-vector products, not peak).
    pub host_flops: f64,
    /// Device compute in flops per second.
    pub device_flops: f64,
}

impl Default for Machine {
    /// Dual-channel DDR5 (the link table's 60 GB/s), 0.5 TFLOPS of CPU compute (a desktop
    /// CPU's sustained quantized matmul), 50 TFLOPS of device compute (a consumer GPU).
    fn default() -> Self {
        Machine {
            host_memory_bandwidth: 60e9,
            host_flops: 0.5e12,
            device_flops: 50e12,
        }
    }
}

/// A batch of at most this many tokens leaves matrix products bandwidth-bound.
const BANDWIDTH_BOUND_TOKENS: u32 = 8;

/// `advise` for a language model: `overflow_bytes` of weights at `bits_per_weight`, each
/// weight used for 2 flops per token of a pass of `tokens_per_pass` tokens (1: decode; the
/// ubatch: prefill). "cpu" means computing those layers where they are, in host memory
/// (llama.cpp's `-ngl` with fewer layers on the device); "stream" means the engine.
pub fn advise_llm(
    overflow_bytes: u64,
    bits_per_weight: f64,
    tokens_per_pass: u32,
    link: &Link,
    machine: &Machine,
) -> Result<Advice> {
    if !(bits_per_weight.is_finite() && bits_per_weight > 0.0 && bits_per_weight <= 64.0) {
        return Err(Error::invalid(format!(
            "advise: bits per weight must be in (0, 64], got {bits_per_weight}"
        )));
    }
    if tokens_per_pass == 0 {
        return Err(Error::invalid("advise: tokens per pass must be at least 1"));
    }
    let flops_per_byte = 2.0 * f64::from(tokens_per_pass) * 8.0 / bits_per_weight;
    let regime = if tokens_per_pass <= BANDWIDTH_BOUND_TOKENS {
        Regime::BandwidthBound
    } else {
        Regime::ComputeBound
    };
    advise(
        overflow_bytes,
        link,
        machine.host_memory_bandwidth,
        machine.host_flops,
        machine.device_flops,
        flops_per_byte,
        regime,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Status;

    #[test]
    fn link_table_names_resolve_and_are_sane() {
        for spec in Link::table() {
            let link = Link::named(spec.name).unwrap();
            link.validate().unwrap();
            assert!(!link.measured);
            assert!(link.latency_s < 0.01, "{}", spec.name);
        }
        // Ordering facts the advice relies on.
        let bw = |n: &str| Link::named(n).unwrap().bandwidth_bytes_per_s;
        assert!(bw("usb2") < bw("pcie2-x4"));
        assert!(bw("pcie3-x16") < bw("pcie4-x16") && bw("pcie4-x16") < bw("pcie5-x16"));
        assert!(bw("pcie4-x16") < bw("ddr5"));
        assert_eq!(Link::named("PCIE4_X16").unwrap().name, "pcie4-x16");
        assert_eq!(Link::named("unified").unwrap().latency_s, 0.0);
    }

    #[test]
    fn bad_links_are_invalid_arguments() {
        let err = Link::named("thunderbolt").unwrap_err();
        assert_eq!(err.status, Status::InvalidArgument);
        assert!(err.message.contains("pcie4-x16"), "{}", err.message);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(
                Link::from_gbps(bad).unwrap_err().status,
                Status::InvalidArgument
            );
        }
        assert!(Link::from_measurement(3.5e9, -1.0).is_err());
        let ok = Link::from_measurement(3.5e9, 20e-6).unwrap();
        assert!(ok.measured);
        assert!(ok.describe().contains("measured"));
        assert_eq!(Link::from_gbps(12.0).unwrap().bandwidth_bytes_per_s, 12e9);
    }

    #[test]
    fn transfer_time_adds_latency_per_transfer() {
        let link = Link::named("pcie4-x16").unwrap();
        // 24 GB in one transfer: 1 s plus 10 us.
        let t = link.transfer_seconds(24_000_000_000);
        assert!((t - 1.00001).abs() < 1e-9, "{t}");
        assert_eq!(link.transfer_seconds(0), 0.0);
    }

    #[test]
    fn decode_on_pcie4_with_ddr5_prefers_cpu() {
        // 8 GB of f16 overflow; batch-1 decode does 2 flops per weight = 1 flop per byte.
        let pcie4 = Link::named("pcie4-x16").unwrap();
        let ddr5 = Link::named("ddr5").unwrap().bandwidth_bytes_per_s;
        let advice = advise(
            8_000_000_000,
            &pcie4,
            ddr5,
            1e12,
            80e12,
            1.0,
            Regime::BandwidthBound,
        )
        .unwrap();
        // Stream: 8/24 s = 0.333 s; CPU: 8/60 s = 0.133 s (flops: 8e9/1e12 = 0.008 s).
        assert_eq!(advice.prefer, "cpu", "{}", advice.reason);
        assert!((advice.cpu_seconds - 8.0 / 60.0).abs() < 1e-9);
        assert!(advice.stream_seconds > 0.33 && advice.stream_seconds < 0.34);
    }

    #[test]
    fn diffusion_prefers_streaming() {
        // Diffusion reuses each f16 weight across ~4096 latent tokens: 2*4096/2 = 4096 flops/byte.
        let pcie3 = Link::named("pcie3-x16").unwrap();
        let ddr4 = Link::named("ddr4").unwrap().bandwidth_bytes_per_s;
        let advice = advise(
            6_000_000_000,
            &pcie3,
            ddr4,
            1e12,
            50e12,
            4096.0,
            Regime::ComputeBound,
        )
        .unwrap();
        // Stream: 0.5 s copy + 24.6e12/50e12 = 0.49 s; CPU: 24.6e12/1e12 = 24.6 s.
        assert_eq!(advice.prefer, "stream", "{}", advice.reason);
        assert!(advice.cpu_seconds > 20.0 && advice.stream_seconds < 1.1);
    }

    #[test]
    fn llm_decode_prefers_cpu_and_prefill_streams_on_pcie4_with_ddr5() {
        // 4 GB of Q4_K (4.5 bits): decode reads each byte once for 3.6 flops.
        let pcie4 = Link::named("pcie4-x16").unwrap();
        let machine = Machine::default();
        let decode = advise_llm(4_000_000_000, 4.5, 1, &pcie4, &machine).unwrap();
        // Stream: 4/24 s = 0.167 s copy; CPU: 4/60 s = 0.067 s.
        assert_eq!(decode.prefer, "cpu", "{}", decode.reason);
        assert!(
            (decode.cpu_seconds - 4.0 / 60.0).abs() < 1e-3,
            "{}",
            decode.cpu_seconds
        );
        let prefill = advise_llm(4_000_000_000, 4.5, 512, &pcie4, &machine).unwrap();
        // CPU: 4e9 * 2 * 512 * 8 / 4.5 flops / 0.5e12 = 14.6 s; stream: 0.167 + 0.146 s.
        assert_eq!(prefill.prefer, "stream", "{}", prefill.reason);
        assert!(prefill.cpu_seconds > 14.0 && prefill.stream_seconds < 0.4);
        assert!(advise_llm(1, 0.0, 1, &pcie4, &machine).is_err());
        assert!(advise_llm(1, 4.5, 0, &pcie4, &machine).is_err());
    }

    #[test]
    fn advise_rejects_nonsense() {
        let link = Link::named("pcie4-x16").unwrap();
        assert!(advise(1, &link, 0.0, 1.0, 1.0, 1.0, Regime::ComputeBound).is_err());
        assert!(advise(1, &link, 1.0, f64::NAN, 1.0, 1.0, Regime::ComputeBound).is_err());
        assert!(advise(1, &link, 1.0, 1.0, 1.0, -1.0, Regime::ComputeBound).is_err());
        let broken = Link {
            bandwidth_bytes_per_s: 0.0,
            ..link
        };
        assert!(advise(1, &broken, 1.0, 1.0, 1.0, 1.0, Regime::ComputeBound).is_err());
    }
}
