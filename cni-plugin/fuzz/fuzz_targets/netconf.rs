//! Network configuration on stdin: `NetConf::parse` and the error path's version lookup
//! take any bytes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = istio_cni::config::NetConf::parse(data);
    let _ = istio_cni::config::request_version(data);
});
