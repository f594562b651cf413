//! A rule, chain or set element message of an nf_tables dump, or a buffer of commit
//! notifications, as the kernel (or anything on the other
//! end of the socket) might send it: decoding never panics, and whatever decodes prints.
#![no_main]

use istio_cni::nft_wire::{commits, decode_chain, decode_rule, decode_set_elements};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rule) = decode_rule(data) {
        let _ = rule.lines();
    }
    if let Ok(chain) = decode_chain(data) {
        let _ = chain.hook.map(|h| h.to_string());
    }
    for key in decode_set_elements(data) {
        let _ = key.to_string();
    }
    let _ = commits(data);
});
