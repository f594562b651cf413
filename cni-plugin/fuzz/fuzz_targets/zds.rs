//! The node agent's side of ZDS reading what ztunnel sends (`decode_hello`, `decode_ack`):
//! any packet gives an answer or an error, never a panic; and any request the agent could
//! send decodes back to itself (prost at our field numbers).
#![no_main]

use istio_cni_node_agent::ambient::zds::{
    decode_ack, decode_hello, AddWorkload, DelWorkload, Request, WorkloadInfo, WorkloadRequest,
};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let _ = decode_hello(data);
    let _ = decode_ack(data, "AddWorkload x");
    let text = String::from_utf8_lossy(data).into_owned();
    for request in [
        Request::Add(AddWorkload {
            uid: text.clone(),
            workload_info: Some(WorkloadInfo {
                name: text.clone(),
                namespace: text.clone(),
                service_account: text.clone(),
            }),
        }),
        Request::Del(DelWorkload { uid: text.clone() }),
    ] {
        let sent = WorkloadRequest {
            payload: Some(request),
        };
        let back = WorkloadRequest::decode(sent.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(back, sent);
    }
});
