//! The `CNI_*` environment: NUL-separated `KEY=VALUE` pairs become the variables a runtime
//! would set; `CniEnv::from_lookup` takes any of them without panicking, and what it accepts
//! has a container ID the spec allows.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let vars: HashMap<String, String> = text
        .split('\0')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    if let Ok(env) = istio_cni::cni::CniEnv::from_lookup(|k| vars.get(k).cloned()) {
        if let Some(id) = &env.container_id {
            assert!(istio_cni::cni::env::validate_container_id(id).is_ok());
        }
    }
});
