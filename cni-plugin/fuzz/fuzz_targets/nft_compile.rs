//! The nftables compiler: any text, as a transaction of ours might be, compiles or is
//! refused with a message; it never panics.
#![no_main]

use istio_cni::rules::nft_compile::compile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(tables) = compile(text) {
            for rule in tables.iter().flat_map(|t| &t.rules) {
                let _ = rule.lines();
            }
        }
    }
});
