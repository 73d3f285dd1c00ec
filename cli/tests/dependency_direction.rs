//! Architecture Invariant (ARCHITECTURE.md): services depend only on the shared protocol crate
//! and on client crates, never on each other's internals. This test reads every workspace
//! crate's manifest and checks its workspace dependencies against the allowed table.

use std::collections::{BTreeMap, BTreeSet};

fn allowed() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let mut m = BTreeMap::new();
    m.insert("proto", BTreeSet::new());
    m.insert("meta", ["continuum-proto"].into());
    m.insert("meta-client", ["continuum-proto"].into());
    m.insert(
        "blockstore",
        ["continuum-proto", "continuum-meta-client"].into(),
    );
    // The NBD protocol crate knows nothing of Continuum: the gateway (cli) adapts volumes to it.
    m.insert("nbd", BTreeSet::new());
    // The overlay is the protocol and its drivers; control through meta will add meta-client.
    m.insert(
        "overlay",
        ["continuum-proto", "continuum-meta-client"].into(),
    );
    // Dev-dependency: meta's tests use the client; the binary wires everything together.
    m.insert(
        "orchestrator",
        [
            "continuum-proto",
            "continuum-meta-client",
            "continuum-blockstore",
        ]
        .into(),
    );
    m.insert(
        "cli",
        [
            "continuum-proto",
            "continuum-meta",
            "continuum-meta-client",
            "continuum-blockstore",
            "continuum-nbd",
            "continuum-overlay",
            "continuum-orchestrator",
        ]
        .into(),
    );
    // Benches measure library cores directly (the EC codec) and services over the wire.
    m.insert(
        "benches",
        [
            "continuum-proto",
            "continuum-meta-client",
            "continuum-blockstore",
        ]
        .into(),
    );
    // Chaos drives meta's sans-IO core and storage twin in its simulator (sim mode only) and
    // the volume client and block stores on their twins; live mode goes through meta-client
    // and speaks NBD to the gateway (nbd's wire constants only).
    m.insert(
        "chaos",
        [
            "continuum-proto",
            "continuum-meta",
            "continuum-meta-client",
            "continuum-blockstore",
            "continuum-nbd",
        ]
        .into(),
    );
    m
}

#[test]
fn crates_depend_only_on_what_the_architecture_allows() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let ws: toml::Value = toml::from_str(&workspace).unwrap();
    let members: Vec<String> = ws["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let allowed = allowed();
    for member in &members {
        let manifest = std::fs::read_to_string(root.join(member).join("Cargo.toml")).unwrap();
        let v: toml::Value = toml::from_str(&manifest).unwrap();
        let ok = allowed
            .get(member.as_str())
            .unwrap_or_else(|| panic!("crate {member} is missing from the dependency table"));
        let deps = v
            .get("dependencies")
            .and_then(|d| d.as_table())
            .cloned()
            .unwrap_or_default();
        for name in deps.keys().filter(|n| n.starts_with("continuum")) {
            assert!(
                ok.contains(name.as_str()),
                "{member} must not depend on {name}"
            );
        }
    }
}
