#![no_main]
//! The config parser's bounds (`parse_bounded`, which runs the pre-check
//! `check_yaml_shape`): any text it accepts is no larger than
//! `MAX_CONFIG_BYTES` and parses into a value no deeper than `MAX_YAML_DEPTH`;
//! and the pre-check's own measure never passes the bound.
use contrast_config::{check_yaml_shape, parse_bounded, value_depth, MAX_CONFIG_BYTES, MAX_YAML_DEPTH};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(measured) = check_yaml_shape(text) {
        assert!(text.len() <= MAX_CONFIG_BYTES && measured <= MAX_YAML_DEPTH);
    }
    if let Ok(v) = parse_bounded(text) {
        let d = value_depth(&v);
        assert!(d <= MAX_YAML_DEPTH, "accepted a document {d} levels deep");
    }
});
