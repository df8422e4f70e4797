//! How a layer's tensors lie in one contiguous device image: packed at the arena's alignment,
//! or, for tensors streamed from a model file, exactly as in the file, so that one aligned
//! read fills the image. The planner's costs (`model_cost`) and the streamer's arena come
//! from the same layouts, so a plan sizes exactly what the engine allocates and counts
//! exactly the bytes it moves.

use crate::planner::{LayerCost, ModelCost};

/// Alignment of tensors inside layer images; a multiple of every ggml backend's alignment.
pub const IMAGE_ALIGNMENT: u64 = 256;

/// Alignment of offsets, lengths and buffers for direct I/O (covers 512 B and 4 KiB sectors).
pub const DIRECT_ALIGNMENT: u64 = 4096;

pub fn align_up(value: u64, alignment: u64) -> u64 {
    let a = alignment.max(1);
    value.div_ceil(a) * a
}

/// One tensor as a layout sees it: its size, and where it lies in a model file when it
/// streams from one (file number, offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub bytes: u64,
    pub file: Option<(u32, u64)>,
}

/// One read that fills a whole layer image from a contiguous stretch of its model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpan {
    pub file: u32,
    /// Aligned down for direct I/O; image offset 0 holds this file offset.
    pub start: u64,
    /// Bytes that must exist in the file from `start` (up to the last tensor's end).
    pub needed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayout {
    /// Offset of each tensor inside the image, in the order given.
    pub offsets: Vec<u64>,
    /// Set when the layer is read from its file in one go (image layout = file layout).
    pub file_span: Option<FileSpan>,
    /// Device bytes of the image, alignment included.
    pub image_bytes: u64,
    /// Bytes of tensor data in it.
    pub data_bytes: u64,
    /// Bytes one load moves: the tensors' data, or the file stretch read in one go.
    pub copy_bytes: u64,
}

/// The tensors one after another, each at the image alignment.
pub fn packed(extents: &[Extent]) -> ImageLayout {
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(extents.len());
    for e in extents {
        offset = align_up(offset, IMAGE_ALIGNMENT);
        offsets.push(offset);
        offset += e.bytes;
    }
    let data_bytes = extents.iter().map(|e| e.bytes).sum();
    ImageLayout {
        offsets,
        file_span: None,
        image_bytes: align_up(offset, IMAGE_ALIGNMENT),
        data_bytes,
        copy_bytes: data_bytes,
    }
}

/// The file's own layout when every tensor comes from one file and the stretch holding them
/// is little more than their data; packed otherwise (tensors of other layers interleaved, or
/// tensors in memory).
pub fn as_in_file_or_packed(extents: &[Extent]) -> ImageLayout {
    let spans: Option<Vec<(u32, u64, u64)>> = extents
        .iter()
        .map(|e| {
            e.file
                .map(|(file, offset)| (file, offset, offset + e.bytes))
        })
        .collect();
    let data_bytes: u64 = extents.iter().map(|e| e.bytes).sum();
    if let Some(spans) = spans.filter(|s| !s.is_empty()) {
        let file = spans[0].0;
        let lo = spans.iter().map(|s| s.1).min().unwrap_or(0);
        let hi = spans.iter().map(|s| s.2).max().unwrap_or(0);
        let start = lo - lo % DIRECT_ALIGNMENT;
        let contiguous = (hi - start) <= data_bytes + data_bytes / 4 + DIRECT_ALIGNMENT;
        if spans.iter().all(|s| s.0 == file) && contiguous {
            return ImageLayout {
                offsets: spans.iter().map(|s| s.1 - start).collect(),
                file_span: Some(FileSpan {
                    file,
                    start,
                    needed: hi - start,
                }),
                image_bytes: align_up(hi - start, DIRECT_ALIGNMENT.max(IMAGE_ALIGNMENT)),
                data_bytes,
                copy_bytes: hi - start,
            };
        }
    }
    packed(extents)
}

/// Extra arena bytes when any image is read straight from a file: the arena's base is shifted
/// up to the direct-I/O alignment inside an allocation this much larger.
pub fn io_slack(images: &[&ImageLayout]) -> u64 {
    if images.iter().any(|i| i.file_span.is_some()) {
        DIRECT_ALIGNMENT - 1
    } else {
        0
    }
}

/// The model as the planner sees it, from its layers' images (in execution order) and the
/// global group's: footprints are image bytes, traffic is copy bytes, and the direct-I/O
/// slack of the arena counts with the always-resident bytes.
pub fn model_cost(layers: &[(&str, &ImageLayout)], global: &ImageLayout) -> ModelCost {
    let all: Vec<&ImageLayout> = layers
        .iter()
        .map(|(_, l)| *l)
        .chain(std::iter::once(global))
        .collect();
    ModelCost {
        layers: layers
            .iter()
            .map(|(name, l)| LayerCost {
                name: name.to_string(),
                bytes: l.image_bytes,
                copy_bytes: l.copy_bytes,
                once_bytes: 0,
                compute_seconds: None,
            })
            .collect(),
        global_bytes: global.image_bytes + io_slack(&all),
        global_copy_bytes: global.copy_bytes,
        bits_per_weight: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(bytes: u64) -> Extent {
        Extent { bytes, file: None }
    }

    #[test]
    fn packed_images_align_every_tensor_and_copy_only_data() {
        let l = packed(&[memory(10), memory(300), memory(1)]);
        assert_eq!(l.offsets, vec![0, 256, 768]);
        assert_eq!(l.image_bytes, 1024);
        assert_eq!((l.data_bytes, l.copy_bytes), (311, 311));
        assert!(l.file_span.is_none());
    }

    #[test]
    fn file_layers_keep_the_file_layout_and_read_the_whole_stretch() {
        let e = |offset, bytes| Extent {
            bytes,
            file: Some((0, offset)),
        };
        let l = as_in_file_or_packed(&[e(5000, 100), e(5120, 200)]);
        let span = l.file_span.expect("one read");
        assert_eq!((span.start, span.needed), (4096, 5320 - 4096));
        assert_eq!(l.offsets, vec![5000 - 4096, 5120 - 4096]);
        assert_eq!(l.copy_bytes, 5320 - 4096);
        assert_eq!(l.image_bytes, 4096);
        // Far apart (other layers' tensors in between): packed, one read per tensor.
        let apart = as_in_file_or_packed(&[e(0, 100), e(1 << 20, 100)]);
        assert!(apart.file_span.is_none());
        assert_eq!(apart.copy_bytes, 200);
    }

    #[test]
    fn model_cost_counts_the_io_slack_as_resident() {
        let file = as_in_file_or_packed(&[Extent {
            bytes: 4096,
            file: Some((0, 0)),
        }]);
        let global = packed(&[memory(8)]);
        let cost = model_cost(&[("blk.0", &file)], &global);
        assert_eq!(cost.global_bytes, 256 + DIRECT_ALIGNMENT - 1);
        assert_eq!(cost.global_copy_bytes, 8);
        assert_eq!(cost.layers[0].copy_bytes, 4096);
        let memory_only = model_cost(&[("blk.0", &global)], &global);
        assert_eq!(memory_only.global_bytes, 256);
    }
}
