//! The nftables read-back's canonical form: any text as `nft -j` output is read without
//! panicking (an error or tables), and the iptables-nft chain scan too.
#![no_main]

use istio_cni::rules::nft_canon::{from_json, iptables_chains};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = from_json(&text);
    let _ = iptables_chains(&text);
});
