//! The plugin-event body the node agent reads from its socket (`AddEvent::parse`): any
//! bytes give a checked event or an error, never a panic; and an event that passes reads
//! back the same after the plugin's own encoding of it.
#![no_main]

use istio_cni::pluginevent::AddEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = AddEvent::parse(data) else {
        return;
    };
    let netns = event.netns.to_str().expect("the netns came from a JSON string");
    let again = AddEvent::new(netns, &event.pod_name, &event.pod_namespace, &event.ips);
    assert_eq!(AddEvent::parse(&again.to_json()).as_ref(), Ok(&event));
});
