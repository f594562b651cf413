//! The nf_tables rule dump decoder ([`istio_cni::nft_wire`]) against `nft` itself. For
//! every upstream nftables golden (the sidecar cases, `conformance/istio-nftables/`, and
//! ambient's in-pod rules, `conformance/istio-ambient/nftables/`), `nft --debug=netlink -f`
//! in a scratch netns prints each rule's expressions as it sends them to the kernel; the
//! kernel's dump of the same tables, decoded and printed by `nft_wire`, must read the
//! same, chain by chain and rule by rule. Counters' counts and the numbers the kernel
//! gives anonymous sets (`__set%d` in what `nft` sends) are left out.
//!
//! Needs root and `nft` (Debian's `nftables`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use istio_cni::nft_wire::{
    dump_chains, dump_rules, dump_set_elements, write, AnonSet, Expr, Transaction, WireTable,
    NFPROTO_INET,
};
use istio_cni::scratch::ScratchNetns;

/// Goldens that do not apply on their own, and why.
const NOT_ALONE: [(&str, &str); 6] = [
    (
        "outbound-owner-groups.golden",
        "names a group (java) this machine does not have",
    ),
    (
        "outbound-owner-groups-exclude.golden",
        "names a group (java) this machine does not have",
    ),
    (
        "ipv6-dns-outbound-owner-groups.golden",
        "names a group (java) this machine does not have",
    ),
    (
        "ipv6-dns-outbound-owner-groups-exclude.golden",
        "names a group (java) this machine does not have",
    ),
    (
        "hostprobe.golden",
        "the node's rules: use a set that the file does not create",
    ),
    (
        "hostprobe_ipv6.golden",
        "the node's rules: use a set that the file does not create",
    ),
];

/// Rules by (table, chain), each as its normalized expression lines.
type Rules = BTreeMap<(String, String), Vec<Vec<String>>>;

/// An expression line without what varies between runs: counters' counts, and the number
/// of an anonymous set.
fn normalize(line: &str) -> String {
    let line = line.trim_end();
    if line.starts_with("  [ counter") {
        return "  [ counter ]".into();
    }
    match line.find("set __set") {
        Some(i) => {
            let rest = &line[i + "set __set".len()..];
            let tail = rest.split_once(' ').map_or("", |(_, t)| t);
            format!("{}set __set {tail}", &line[..i])
        }
        None => line.to_owned(),
    }
}

/// The rules in what `nft --debug=netlink` printed, in the order sent: a block per rule,
/// `inet TABLE CHAIN` then its `  [ … ]` lines.
fn parse_debug(text: &str) -> Vec<((String, String), Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<((String, String), Vec<String>)> = None;
    let mut flush = |current: &mut Option<((String, String), Vec<String>)>| {
        if let Some(block) = current.take() {
            out.push(block);
        }
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        if words.len() >= 3 && words[0] == "inet" && !line.contains("(null)") {
            flush(&mut current);
            current = Some(((words[1].to_owned(), words[2].to_owned()), Vec::new()));
        } else if line.starts_with("  [ ") {
            if let Some((_, lines)) = current.as_mut() {
                lines.push(normalize(line));
            }
        } else {
            flush(&mut current);
        }
    }
    flush(&mut current);
    out
}

/// The rules a transaction leaves, by chain: the blocks `nft` sent (`sent`, in order),
/// each appended to its chain, or, for an `insert rule … [index N]` line of the
/// transaction `text` (the debug output does not say which), put before the chain's
/// rule N (its head without an index).
fn chains_after(text: &str, sent: Vec<((String, String), Vec<String>)>) -> Rules {
    let inserts: Vec<Option<usize>> = text
        .lines()
        .filter(|l| l.starts_with("add rule ") || l.starts_with("insert rule "))
        .map(|l| {
            l.starts_with("insert rule ").then(|| {
                let words: Vec<&str> = l.split(' ').collect();
                words
                    .windows(2)
                    .find(|w| w[0] == "index")
                    .map_or(0, |w| w[1].parse().unwrap())
            })
        })
        .collect();
    assert_eq!(inserts.len(), sent.len(), "a block per rule line");
    let mut out = Rules::new();
    for ((key, lines), insert) in sent.into_iter().zip(inserts) {
        let chain = out.entry(key).or_default();
        match insert {
            Some(at) => chain.insert(at.min(chain.len()), lines),
            None => chain.push(lines),
        }
    }
    out
}

/// The `nft` binary.
fn nft() -> &'static str {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("nft not found: install nftables (make test does)")
}

fn goldens() -> Vec<PathBuf> {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut out = Vec::new();
    for dir in ["istio-nftables", "istio-ambient/nftables"] {
        for entry in std::fs::read_dir(base.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".golden") && !NOT_ALONE.iter().any(|(n, _)| *n == name) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_kernels_rules_decode_to_what_nft_sent() {
    let nft = nft();
    let cases = goldens();
    assert!(cases.len() >= 30, "{} goldens", cases.len());
    let mut rules_seen = 0;
    for golden in cases {
        let scratch = ScratchNetns::create().unwrap();
        let (sent, held) = scratch
            .netns()
            .run(|inside| {
                let out = Command::new(nft)
                    .arg("--debug=netlink")
                    .arg("-f")
                    .arg(&golden)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}: {}",
                    golden.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = std::fs::read_to_string(&golden).unwrap();
                let sent = chains_after(&text, parse_debug(&String::from_utf8_lossy(&out.stdout)));
                let tables: std::collections::BTreeSet<String> =
                    sent.keys().map(|(t, _)| t.clone()).collect();
                let mut held = Rules::new();
                for table in tables {
                    for rule in dump_rules(inside, NFPROTO_INET, Some(&table)).unwrap() {
                        held.entry((rule.table.clone(), rule.chain.clone()))
                            .or_default()
                            .push(rule.lines().iter().map(|l| normalize(l)).collect());
                    }
                }
                (sent, held)
            })
            .unwrap();
        assert!(!sent.is_empty(), "{}: no rule parsed", golden.display());
        for (key, want) in &sent {
            let got = held.get(key).cloned().unwrap_or_default();
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(g, w, "{}: {} {} rule {i}", golden.display(), key.0, key.1);
            }
            assert_eq!(got.len(), want.len(), "{}: {key:?}", golden.display());
            rules_seen += want.len();
        }
        assert_eq!(
            held.keys().collect::<Vec<_>>(),
            sent.keys().collect::<Vec<_>>(),
            "{}",
            golden.display()
        );
    }
    eprintln!("{rules_seen} rules decoded as nft sent them");
}

/// The chains of every golden, as the kernel holds them after `nft -f`: the same names in
/// the same order, each base chain with the type, hook and priority the transaction gave.
#[test]
fn the_kernels_chains_decode_to_what_the_transaction_declared() {
    let nft = nft();
    for golden in goldens() {
        let text = std::fs::read_to_string(&golden).unwrap();
        // (table, "name" or "name { spec }") in the order declared.
        let declared: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("add chain inet "))
            .map(|rest| {
                let (table, chain) = rest.split_once(' ').unwrap();
                (table.to_owned(), chain.to_owned())
            })
            .collect();
        let tables: std::collections::BTreeSet<&String> = declared.iter().map(|(t, _)| t).collect();
        let scratch = ScratchNetns::create().unwrap();
        let held: Vec<(String, String)> = scratch
            .netns()
            .run(|inside| {
                let out = Command::new(nft).arg("-f").arg(&golden).output().unwrap();
                assert!(out.status.success(), "{}", golden.display());
                let mut held = Vec::new();
                for table in &tables {
                    for c in dump_chains(inside, NFPROTO_INET, Some(table)).unwrap() {
                        let spelled = match &c.hook {
                            Some(h) => format!("{} {{ {h} }}", c.name),
                            None => c.name.clone(),
                        };
                        held.push((c.table, spelled));
                    }
                }
                held
            })
            .unwrap();
        let mut want = declared.clone();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        let mut got = held;
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want, "{}", golden.display());
    }
}

/// What the kernel holds in `names` (family inet): chains, and rules each with the
/// elements of the anonymous sets its lookups name.
fn kernel_tables(inside: &istio_cni::netns::Inside<'_>, names: &[String]) -> Vec<WireTable> {
    names
        .iter()
        .map(|name| {
            let mut rules = dump_rules(inside, NFPROTO_INET, Some(name)).unwrap();
            for r in &mut rules {
                for e in &r.exprs {
                    if let Expr::Lookup { set, .. } = e {
                        r.sets.push(AnonSet {
                            key_type: 0,
                            key_len: 0,
                            elements: dump_set_elements(inside, NFPROTO_INET, name, set).unwrap(),
                            userdata: Vec::new(),
                        });
                    }
                }
            }
            WireTable {
                family: NFPROTO_INET,
                name: name.clone(),
                chains: dump_chains(inside, NFPROTO_INET, Some(name)).unwrap(),
                rules,
            }
        })
        .collect()
}

/// Tables as comparable lines: each chain with its hook, each rule's expressions exactly
/// (`Debug`: every byte of every value, not only the printed words), an anonymous set by
/// its elements instead of the number the kernel gave it.
fn shape(tables: &[WireTable]) -> Vec<String> {
    let mut out = Vec::new();
    for t in tables {
        for c in &t.chains {
            out.push(format!("{} {} {:?}", t.name, c.name, c.hook));
        }
        for r in &t.rules {
            out.push(format!("{} {}", t.name, r.chain));
            let mut sets = r.sets.iter();
            for e in &r.exprs {
                match e {
                    Expr::Lookup { sreg, set, flags } if set.starts_with("__set") => {
                        let elements = sets.next().map(|s| &s.elements);
                        out.push(format!("lookup {sreg} {flags} anonymous {elements:?}"));
                    }
                    e => out.push(format!("{e:?}")),
                }
            }
        }
    }
    out
}

/// The compiler and the writer against `nft` and the kernel: every golden, applied with
/// `nft -f` in one scratch netns, leaves exactly what the golden's text compiles to
/// ([`istio_cni::rules::nft_compile::compile`]: every expression and every byte of its
/// values, each anonymous set's elements), and our batch of that
/// ([`istio_cni::nft_wire::write`]) leaves exactly the same in another.
#[test]
fn every_golden_compiles_to_what_nft_writes_and_our_batch_writes_it() {
    use istio_cni::rules::nft_compile::compile;
    let nft = nft();
    let mut checked = 0;
    for golden in goldens() {
        let text = std::fs::read_to_string(&golden).unwrap();
        let ours = compile(&text).unwrap_or_else(|e| panic!("{}: {e}", golden.display()));
        let names: Vec<String> = ours.iter().map(|t| t.name.clone()).collect();
        let a = ScratchNetns::create().unwrap();
        let by_nft = a
            .netns()
            .run(|inside| {
                let out = Command::new(nft).arg("-f").arg(&golden).output().unwrap();
                assert!(out.status.success(), "{}", golden.display());
                kernel_tables(inside, &names)
            })
            .unwrap();
        assert_eq!(
            shape(&ours),
            shape(&by_nft),
            "{}: compiled vs nft",
            golden.display()
        );
        let b = ScratchNetns::create().unwrap();
        let by_us = b
            .netns()
            .run(|inside| {
                let tx = Transaction {
                    delete: Vec::new(),
                    tables: ours.clone(),
                };
                write(inside, &tx)
                    .unwrap_or_else(|e| panic!("{}: our batch: {e}", golden.display()));
                // Written twice: the flush replaces the rules, the sets go with them.
                write(inside, &tx).unwrap();
                kernel_tables(inside, &names)
            })
            .unwrap();
        assert_eq!(
            shape(&by_us),
            shape(&by_nft),
            "{}: ours vs nft",
            golden.display()
        );
        checked += 1;
    }
    eprintln!("{checked} goldens: compiled, written by nft and by us, all the same");
    assert!(checked >= 30, "{checked}");
}

/// A long batch (thousands of rules: a pod with many annotated ports or ranges) is sent
/// in one datagram and acknowledged once, so neither the send buffer nor acks filling the
/// receive buffer make a committed write look failed; and a batch with one bad message
/// fails whole, leaving nothing.
#[test]
fn a_long_batch_commits_and_a_bad_one_leaves_nothing() {
    use istio_cni::rules::nft_compile::compile;
    let mut text = String::from("add table inet t\nflush table inet t\nadd chain inet t c\n");
    for port in 1..=3000 {
        text.push_str(&format!(
            "add rule inet t c tcp dport {port} counter return\n"
        ));
    }
    let tables = compile(&text).unwrap();
    let tx = Transaction {
        delete: Vec::new(),
        tables,
    };
    let scratch = ScratchNetns::create().unwrap();
    scratch
        .netns()
        .run(|inside| {
            write(inside, &tx).unwrap();
            assert_eq!(
                dump_rules(inside, NFPROTO_INET, Some("t")).unwrap().len(),
                3000
            );
            // A jump to a chain that does not exist, last in a batch that also deletes t.
            let bad = compile(
                "add table inet u\nflush table inet u\nadd chain inet u c\nadd rule inet u c jump nowhere\n",
            )
            .unwrap();
            let err = write(
                inside,
                &Transaction {
                    delete: vec![(NFPROTO_INET, "t".into())],
                    tables: bad,
                },
            )
            .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
            assert_eq!(
                dump_rules(inside, NFPROTO_INET, Some("t")).unwrap().len(),
                3000,
                "t is still there"
            );
            assert!(dump_chains(inside, NFPROTO_INET, Some("u")).unwrap().is_empty());
        })
        .unwrap();
}

/// The ruleset generation (what STATUS asks to learn that the kernel speaks nf_tables)
/// moves with every commit.
#[test]
fn the_generation_moves_with_each_commit() {
    use istio_cni::nft_wire::generation;
    let scratch = ScratchNetns::create().unwrap();
    scratch
        .netns()
        .run(|inside| {
            let before = generation().unwrap();
            let tables =
                istio_cni::rules::nft_compile::compile("add table inet g\nadd chain inet g c\n")
                    .unwrap();
            write(
                inside,
                &Transaction {
                    delete: Vec::new(),
                    tables,
                },
            )
            .unwrap();
            assert_ne!(generation().unwrap(), before);
        })
        .unwrap();
}
