#![no_main]
//! The config pre-check (`check_yaml_shape`): any text it accepts parses into
//! a YAML value no deeper than `MAX_YAML_DEPTH` (the property), and is no
//! larger than `MAX_CONFIG_BYTES`.
use contrast_config::{check_yaml_shape, MAX_CONFIG_BYTES, MAX_YAML_DEPTH};
use libfuzzer_sys::fuzz_target;

fn depth(v: &serde_yaml_ng::Value) -> usize {
    match v {
        serde_yaml_ng::Value::Sequence(s) => 1 + s.iter().map(depth).max().unwrap_or(0),
        serde_yaml_ng::Value::Mapping(m) => 1 + m.iter().map(|(k, v)| depth(k).max(depth(v))).max().unwrap_or(0),
        serde_yaml_ng::Value::Tagged(t) => depth(&t.value),
        _ => 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(measured) = check_yaml_shape(text) else { return };
    assert!(text.len() <= MAX_CONFIG_BYTES);
    assert!(measured <= MAX_YAML_DEPTH);
    if let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text) {
        let d = depth(&v);
        assert!(d <= MAX_YAML_DEPTH, "accepted a document {d} levels deep (measured {measured})");
    }
});
