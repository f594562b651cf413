//! The read-back's canonical form: any `iptables-save` text (and any single rule line) is
//! parsed without panicking, in both families.
#![no_main]

use istio_cni::rules::canon::{CanonRule, SavedTables};
use istio_cni::rules::Family;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for family in [Family::V4, Family::V6] {
        let _ = SavedTables::parse(&text, family);
        for line in text.lines() {
            let _ = CanonRule::parse(line, family);
        }
    }
});
