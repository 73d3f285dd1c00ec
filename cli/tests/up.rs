//! `continuum up` brings the local fabric up, and a second run resumes on the same data.

mod common;

use std::process::Command;

fn up_check(data_dir: &std::path::Path, base_port: u16) -> String {
    let out = Command::new(common::bin())
        .args([
            "up",
            "--check",
            "--base-port",
            &base_port.to_string(),
            "--data-dir",
        ])
        .arg(data_dir)
        .output()
        .expect("run continuum up");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "continuum up failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn up_starts_the_fabric_and_resumes_on_its_data() {
    let dir = tempfile::tempdir().unwrap();
    // A base port whose three ranges (+11.., +21.., +31..) are free right now.
    let base = loop {
        let p = common::free_port();
        if p < 31_900
            && [
                11u16, 12, 13, 21, 22, 23, 31, 32, 33, 101, 102, 103, 104, 105, 106, 201, 202, 203,
                204, 205, 206,
            ]
            .iter()
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", p + o)).is_ok())
        {
            break p;
        }
    };
    let first = up_check(dir.path(), base);
    assert!(first.contains("Continuum is up."), "{first}");
    assert!(first.contains("meta leader"), "{first}");
    assert!(first.contains("block servers  6 registered"), "{first}");
    for i in 1..=3 {
        assert!(dir.path().join(format!("meta-{i}/db/CURRENT")).exists());
        assert!(dir.path().join(format!("logs/meta-{i}.log")).exists());
    }
    for i in 1..=6 {
        assert!(dir.path().join(format!("block-{i}/index/CURRENT")).exists());
    }
    let second = up_check(dir.path(), base);
    assert!(second.contains("Continuum is up."), "{second}");
}
