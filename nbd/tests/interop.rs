//! The NBD server against real clients (libnbd's nbdinfo/nbdcopy/nbdsh, QEMU's qemu-io and
//! qemu-img) over an in-memory export: protocol conformance without the block store. The
//! gateway's tests (cli/tests/gateway.rs) repeat the important ones over real volumes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use continuum_nbd::mem::{MemCatalog, MemExport};
use continuum_nbd::server::{serve_tcp, serve_unix, ServerConfig};

struct Server {
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    tcp_port: u16,
    export: Arc<MemExport>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Server {
    fn start(size: u64, tls: Option<(Arc<rustls::ServerConfig>, bool)>) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let mut catalog = MemCatalog::new();
        let export = catalog.add("disk", size);
        let catalog = Arc::new(catalog);
        let (stop, rx) = tokio::sync::watch::channel(false);
        let config = Arc::new(ServerConfig {
            tls_required: tls.as_ref().is_some_and(|t| t.1),
            tls: tls.map(|t| t.0),
            request_timeout: Duration::from_secs(30),
        });
        let tcp_port = rt.block_on(async {
            let unix = tokio::net::UnixListener::bind(&socket).unwrap();
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = tcp.local_addr().unwrap().port();
            tokio::spawn(serve_unix(
                unix,
                catalog.clone(),
                config.clone(),
                rx.clone(),
            ));
            tokio::spawn(serve_tcp(tcp, catalog, config, rx));
            port
        });
        Server {
            _rt: rt,
            _dir: dir,
            socket,
            tcp_port,
            export,
            stop,
        }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Runs a command; panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?} (is it installed? scripts/setup.sh installs it): {e}")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn nbdinfo_sees_every_capability_and_holes_on_a_fresh_export() {
    let s = Server::start(64 << 20, None);
    let json: serde_json::Value =
        serde_json::from_str(&run(Command::new("nbdinfo").args(["--json", &s.uri()]))).unwrap();
    let e = &json["exports"][0];
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(e[cap], serde_json::Value::Bool(true), "{cap} in {e}");
    }
    assert_eq!(e["export-size"], 64 << 20);
    assert_eq!(e["is_read_only"], false);
    let contexts = e["contexts"].to_string();
    assert!(contexts.contains("base:allocation"), "{contexts}");
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    // A fresh export is one hole.
    let map = run(Command::new("nbdinfo").args(["--map", "--json", &s.uri()]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert_eq!(map.as_array().unwrap().len(), 1, "{map}");
    assert_eq!(map[0]["type"], 3, "{map}");
    assert_eq!(map[0]["length"], 64 << 20);
    // The list of exports.
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &s.uri()]));
    assert!(list.contains("\"disk\""), "{list}");
}

#[test]
fn qemu_io_patterns_at_unaligned_offsets_over_tcp_and_unix() {
    let s = Server::start(16 << 20, None);
    let tcp = format!("nbd://127.0.0.1:{}/disk", s.tcp_port);
    for (uri, off) in [(s.uri(), 0u64), (tcp, 8 << 20)] {
        let script = [
            format!("write -P 0xab {} 5000", off + 1),
            format!("write -P 0xcd {} 3", off + 7000),
            format!("write -z {} 1000", off + 2000),
            "flush".to_string(),
            format!("read -P 0x00 {} 1", off),
            format!("read -P 0xab {} 999", off + 1),
            format!("read -P 0x00 {} 1000", off + 2000),
            format!("read -P 0xab {} 2001", off + 3000),
            format!("read -P 0xcd {} 3", off + 7000),
            format!("read -P 0x00 {} 100", off + 7003),
            format!("write -P 0x11 -f {} 65536", off + 1 + (1 << 20)),
            format!("read -P 0x11 {} 65536", off + 1 + (1 << 20)),
        ];
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in &script {
            cmd.args(["-c", c]);
        }
        cmd.arg(&uri);
        let out = run(&mut cmd);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert!(!out.to_lowercase().contains("error"), "{out}");
    }
}

#[test]
fn out_of_range_requests_fail_cleanly_and_others_still_work() {
    let s = Server::start(1 << 20, None);
    let script = r#"
import nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(URI)
for off, n in [((1 << 20) - 1, 2), (1 << 40, 1)]:
    try:
        h.pread(n, off)
        raise SystemExit("read beyond the end succeeded")
    except nbd.Error as e:
        assert e.errnum == 22, e
try:
    h.pwrite(b"x" * 10, (1 << 20) - 5)
    raise SystemExit("write beyond the end succeeded")
except nbd.Error as e:
    assert e.errnum in (22, 28), e
h.pwrite(b"y" * 4096, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 4096) == b"y" * 4096
seen = []
h.block_status(1 << 20, 0, lambda ctx, off, ents, err: seen.append((ctx, ents)))
assert seen[0][0] == "base:allocation", seen
ents = seen[0][1]
assert ents[0] == 65536 and ents[1] == 0, ents
assert ents[2] == (1 << 20) - 65536 and ents[3] == 3, ents
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 0) == bytes(65536)
h.trim(4096, 8192)
h.cache(4096, 0)
h.flush()
h.shutdown()
print("ok")
"#
    .replace("URI", &format!("{:?}", s.uri()));
    // libnbd's Python binding (what nbdsh runs), with Debian's interpreter that has it.
    let out = run(Command::new("/usr/bin/python3").args(["-c", &script]));
    assert!(out.contains("ok"), "{out}");
    // The write beyond the end changed nothing; the zeroed chunk was freed.
    assert_eq!(s.export.allocated_chunks(), 0);
}

fn write_random(path: &Path, bytes: usize, seed: u64) {
    let mut x = seed | 1;
    let mut data = vec![0u8; bytes];
    for (i, b) in data.iter_mut().enumerate() {
        // xorshift; leave some 64 KiB runs of zeros so sparse copying is exercised.
        if (i / 65536) % 5 == 3 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn nbdcopy_and_qemu_img_both_ways_are_identical() {
    let s = Server::start(32 << 20, None);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let back2 = dir.path().join("back2.img");
    write_random(&src, 32 << 20, 42);
    run(Command::new("nbdcopy").args([src.to_str().unwrap(), &s.uri()]));
    run(Command::new("nbdcopy").args([&s.uri(), back.to_str().unwrap()]));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap());
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &s.uri(),
        back2.to_str().unwrap(),
    ]));
    run(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src.to_str().unwrap(),
        &s.uri(),
    ]));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back2).unwrap());
}
