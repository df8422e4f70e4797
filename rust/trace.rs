//! Timeline of copies, waits and computes, written as Chrome trace-event JSON (Perfetto,
//! chrome://tracing). Recording is off unless asked for, and then one short lock per event.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    Compute,
    Copy,
    Wait,
}

impl Lane {
    fn thread_id(self) -> u32 {
        match self {
            Lane::Compute => 1,
            Lane::Wait => 2,
            Lane::Copy => 3,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Span {
    pub lane: Lane,
    pub name: String,
    pub start_us: u64,
    pub duration_us: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct Trace {
    enabled: bool,
    epoch: Instant,
    spans: Arc<Mutex<Vec<Span>>>,
    layer_names: Arc<Mutex<Vec<String>>>,
}

impl Trace {
    pub fn new(enabled: bool, epoch: Instant) -> Trace {
        Trace {
            enabled,
            epoch,
            spans: Arc::default(),
            layer_names: Arc::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The instant span times count from.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    pub fn set_layer_names(&self, names: Vec<String>) {
        *self.layer_names.lock().unwrap_or_else(|p| p.into_inner()) = names;
    }

    pub fn record(&self, lane: Lane, name: &str, start_us: u64, duration_us: u64) {
        if self.enabled {
            self.push(Span {
                lane,
                name: name.to_string(),
                start_us,
                duration_us,
                bytes: 0,
            });
        }
    }

    pub fn record_copy(&self, layer: usize, start: Instant, duration_us: u64, bytes: u64) {
        if !self.enabled {
            return;
        }
        let name = self
            .layer_names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(layer)
            .cloned()
            .unwrap_or_else(|| format!("layer {layer}"));
        self.push(Span {
            lane: Lane::Copy,
            name,
            start_us: start.saturating_duration_since(self.epoch).as_micros() as u64,
            duration_us,
            bytes,
        });
    }

    fn push(&self, span: Span) {
        self.spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(span);
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn clear(&self) {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Microseconds during which a copy and a compute ran at the same time.
    pub fn overlap_us(&self) -> u64 {
        let spans = self.spans();
        let mut overlap = 0u64;
        let computes: Vec<&Span> = spans.iter().filter(|s| s.lane == Lane::Compute).collect();
        for copy in spans.iter().filter(|s| s.lane == Lane::Copy) {
            let (c0, c1) = (copy.start_us, copy.start_us + copy.duration_us);
            for compute in &computes {
                let (k0, k1) = (compute.start_us, compute.start_us + compute.duration_us);
                overlap += c1.min(k1).saturating_sub(c0.max(k0));
            }
        }
        overlap
    }

    /// Writes the Chrome trace-event JSON ("X" complete events, one thread per lane).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut events = Vec::new();
        for lane in [Lane::Compute, Lane::Wait, Lane::Copy] {
            events.push(serde_json::json!({
                "ph": "M", "name": "thread_name", "pid": 1, "tid": lane.thread_id(),
                "args": { "name": format!("{lane:?}").to_lowercase() }
            }));
        }
        for span in self.spans() {
            events.push(serde_json::json!({
                "ph": "X", "name": span.name, "cat": format!("{:?}", span.lane).to_lowercase(),
                "pid": 1, "tid": span.lane.thread_id(), "ts": span.start_us, "dur": span.duration_us,
                "args": { "bytes": span.bytes }
            }));
        }
        let doc = serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" });
        let mut file = std::fs::File::create(path).map_err(|e| Error::io(path.display(), e))?;
        file.write_all(doc.to_string().as_bytes())
            .map_err(|e| Error::io(path.display(), e))
    }
}
