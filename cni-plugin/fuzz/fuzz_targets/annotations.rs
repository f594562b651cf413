//! Pod annotations → `Redirect` → rules: lines `INDEX=VALUE` set the annotation (or proxy
//! env var) with that index. Either the redirect is refused with an error naming one of the
//! keys that were set, or every rule it generates can be parsed by the read-back's
//! canonical form (the property whose absence let `excludeInterfaces: "-j"` panic ADD).
#![no_main]

use istio_cni::pod::MeshedPod;
use istio_cni::redirect::*;
use istio_cni::rules::canon::CanonRule;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut pod = MeshedPod::default();
    for line in text.split('\n') {
        let Some((i, value)) = line.split_once('=') else {
            continue;
        };
        let Ok(i) = i.parse::<usize>() else { continue };
        if let Some(key) = ANNOTATIONS.get(i) {
            pod.annotations.insert((*key).to_owned(), value.to_owned());
        } else if let Some(key) = i
            .checked_sub(ANNOTATIONS.len())
            .and_then(|j| PROXY_ENV.get(j))
        {
            pod.proxy_env.insert((*key).to_owned(), value.to_owned());
        } else if i == 13 {
            pod.proxy_uid = value.parse().ok();
        }
    }
    match Redirect::from_pod(&pod) {
        Err(e) => assert!(
            pod.annotations
                .keys()
                .chain(pod.proxy_env.keys())
                .any(|k| e.source_name.ends_with(k.as_str())),
            "the error names a key that was not set: {e}"
        ),
        Ok(r) => {
            let ruleset = istio_cni::rules::iptables::build(&r, true);
            for f in &ruleset.families {
                for rule in &f.rules {
                    let line = rule.restore_line();
                    if let Err(e) = CanonRule::parse(&line, f.family) {
                        panic!("generated rule {line:?} cannot be read back: {e:?}");
                    }
                }
            }
            let _ = ruleset.render();
        }
    }
});
