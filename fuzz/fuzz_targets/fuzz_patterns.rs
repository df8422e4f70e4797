//! Feeds arbitrary text to the layer-name patterns. Input layout: the first line is a user
//! regex, the second a comma-separated kind order, the remaining lines tensor names. Checks
//! that nothing panics and that every match is a well-formed piece of its tensor name.
#![no_main]

#[allow(dead_code)]
#[path = "../../rust/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../../rust/patterns.rs"]
mod patterns;

use error::Status;
use libfuzzer_sys::fuzz_target;
use patterns::{Matched, Pattern};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let regex = lines.next().unwrap_or_default();
    let kind_order: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let names: Vec<&str> = lines.collect();

    match Pattern::user(regex, &kind_order) {
        Ok(user) => {
            for name in &names {
                match user.try_match_name(name) {
                    Ok(Some(m)) => check(name, &m),
                    Ok(None) => {}
                    Err(e) => assert_eq!(e.status, Status::InvalidArgument, "{e}"),
                }
            }
        }
        Err(e) => assert_eq!(e.status, Status::InvalidArgument, "{e}"),
    }

    let detected = patterns::detect(&names);
    assert!(patterns::builtin_names().contains(&detected.name()));
    for builtin in patterns::builtin_names() {
        let pattern = Pattern::builtin(builtin).expect("listed builtins exist");
        for name in &names {
            let _ = patterns::split_prefix(name);
            if let Some(m) = pattern.match_name(name) {
                check(name, &m);
            }
        }
    }
});

/// A layer name is a non-empty piece of the tensor name that ends where the layer index (or
/// the un-numbered layer's name) ends.
fn check(name: &str, m: &Matched) {
    assert!(!m.layer_name.is_empty(), "{name}");
    assert!(
        name.contains(m.layer_name.as_str()),
        "{name} -> {}",
        m.layer_name
    );
}
