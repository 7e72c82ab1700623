#![no_main]
//! YAML config text → `Config` → `Plan` (as `trainer --config` reads it).
use contrast_config::{Config, Plan, Topology};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Config::from_yaml(text, "fuzz.yaml") {
        let topo = Topology { world_size: 2, local_size: 2, host_cores: 2, rank_cores: 1 };
        let _ = Plan::resolve(c, topo, &contrast_nn::Registry);
    }
});
