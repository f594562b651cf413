//! `prevResult` conversion: any JSON value, converted to every supported version, gives a
//! result object carrying that version; the pod IPs read from it never panic.
#![no_main]

use istio_cni::cni::result::{chained_result, pod_ips};
use istio_cni::cni::CniVersion;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(prev) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    for v in CniVersion::SUPPORTED {
        let out = chained_result(Some(&prev), v);
        assert_eq!(out["cniVersion"], v.to_string());
    }
    let _ = pod_ips(Some(&prev));
});
