//! Feeds arbitrary bytes to the GGUF reader. Beyond "never panics", it checks what a successful
//! parse promises, and that writing a parsed file back out and re-reading it is stable.
#![no_main]

// The modules under test, compiled standalone: they depend only on std and crate::error.
#[allow(dead_code)]
#[path = "../../rust/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../rust/gguf.rs"]
mod gguf;

use error::Status;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = match gguf::parse_bytes(data) {
        Ok(file) => file,
        Err(e) => {
            // Memory input cannot fail with an I/O error, and every error says something.
            assert_eq!(e.status, Status::CorruptFile, "{e}");
            assert!(!e.message.is_empty());
            return;
        }
    };
    assert!(file.alignment.is_power_of_two());
    assert_eq!(file.data_offset % file.alignment, 0);
    for t in &file.tensors {
        assert!(t.dims.len() <= gguf::MAX_DIMS);
        assert_eq!(t.offset % file.alignment, 0, "{}", t.name);
        let end = t
            .offset
            .checked_add(t.bytes)
            .expect("checked by the reader");
        assert!(
            t.offset >= file.data_offset && end <= file.file_size,
            "{}",
            t.name
        );
        assert_eq!(gguf::tensor_bytes(t.ggml_type, &t.dims).ok(), Some(t.bytes));
    }

    // Round trip: a parsed file can always be written again, and the result reads back to
    // the same bytes when written once more (float NaNs make Value equality unusable).
    // A valid but huge alignment (up to 2 GiB) would be padded in memory: not worth it here.
    if file.alignment > 1 << 20 {
        return;
    }
    let once = rewrite(&file);
    let reparsed = gguf::parse_bytes(&once).expect("a rewritten file parses");
    assert_eq!(reparsed.metadata.len(), file.metadata.len());
    assert_eq!(reparsed.tensors.len(), file.tensors.len());
    assert_eq!(rewrite(&reparsed), once);
});

fn rewrite(file: &gguf::GgufFile) -> Vec<u8> {
    let mut w = gguf::Writer::new();
    for (key, value) in &file.metadata {
        w.add_kv(key, value.clone());
    }
    for t in &file.tensors {
        // The data is at most the input's size, so zeros cost little.
        w.add_tensor_zeroed(&t.name, t.ggml_type, &t.dims)
            .expect("a parsed tensor is writable");
    }
    let mut out = Vec::new();
    w.write_to(&mut out).expect("a parsed file is writable");
    out
}
