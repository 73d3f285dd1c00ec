//! The NBD gateway as a process over real volumes (a meta member, 6 block servers in their own
//! failure domains), driven by real NBD clients: nbdinfo, qemu-img, qemu-io, nbdcopy and fio.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::fabric::{continuum, fabric, run, Gateway};

fn write_random(path: &Path, bytes: usize, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    for mb in 0..bytes >> 20 {
        // Every fifth MiB stays zero, so sparse copies and block status are exercised.
        if mb % 5 == 4 {
            block.fill(0);
        } else {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
        }
        f.write_all(&block).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_volumes_to_qemu_libnbd_and_fio() {
    let mut f = fabric().await;
    let ep = f.meta_ep.clone();
    continuum(&ep, &["volume", "create", "disk", "--size", "1G"]);
    continuum(&ep, &["volume", "create", "busy", "--size", "128M"]);
    continuum(
        &ep,
        &[
            "volume",
            "create",
            "small",
            "--size",
            "64M",
            "--profile",
            "2+1",
        ],
    );
    let gw = Gateway::start(f.dir.path(), "gw-1", &ep, &[]);

    // Capabilities, exports, and holes on a fresh volume.
    let info = run(Command::new("nbdinfo").args(["--json", &gw.uri("disk")]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let e = &info["exports"][0];
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_multi_conn",
    ] {
        assert_eq!(e[cap], serde_json::Value::Bool(true), "{cap}: {e}");
    }
    assert_eq!(e["export-size"], 1u64 << 30);
    assert!(e["contexts"].to_string().contains("base:allocation"), "{e}");
    let map = run(Command::new("nbdinfo").args(["--map", "--json", &gw.uri("disk")]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert_eq!(map.as_array().unwrap().len(), 1, "one hole: {map}");
    assert_eq!(map[0]["type"], 3, "{map}");
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &gw.uri("disk")]));
    assert!(
        list.contains("\"disk\"") && list.contains("\"small\""),
        "{list}"
    );
    let missing = Command::new("nbdinfo")
        .arg(gw.uri("nope"))
        .output()
        .unwrap();
    assert!(!missing.status.success());

    // qemu-io pattern checks at unaligned offsets and sizes (over TCP).
    let script = [
        "write -P 0xab 1 5000",
        "write -P 0xcd 7000 3",
        "write -z 2000 1000",
        "write -P 0x5a -f 262143 70001",
        "flush",
        "read -P 0x00 0 1",
        "read -P 0xab 1 1999",
        "read -P 0x00 2000 1000",
        "read -P 0xab 3000 2001",
        "read -P 0xcd 7000 3",
        "read -P 0x00 7003 100",
        "read -P 0x5a 262143 70001",
        "read -P 0x00 332144 1000",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in script {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(gw.tcp_uri("small")));
    assert!(!out.contains("verification failed"), "{out}");

    // qemu-img convert of 1 GiB of random data in and back out; identical.
    let src = f.dir.path().join("src.img");
    let back = f.dir.path().join("back.img");
    write_random(&src, 1 << 30, 7);
    run(Command::new("qemu-img")
        .args(["convert", "-p", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(gw.uri("disk")));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(gw.uri("disk"))
        .arg(&back));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&back));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(gw.uri("disk")));
    std::fs::remove_file(&back).unwrap();
    // Block status now: the zero MiBs written by convert are holes or zeros, the rest data.
    let map = run(Command::new("nbdinfo").args(["--map", "--totals", &gw.uri("disk")]));
    assert!(map.contains("data"), "{map}");

    // nbdcopy both ways, with several connections (multi-conn).
    let small_src = f.dir.path().join("small-src.img");
    let small_back = f.dir.path().join("small-back.img");
    write_random(&small_src, 64 << 20, 11);
    run(Command::new("nbdcopy")
        .args(["--connections=4"])
        .arg(&small_src)
        .arg(gw.uri("small")));
    run(Command::new("nbdcopy")
        .args(["--connections=4"])
        .arg(gw.uri("small"))
        .arg(&small_back));
    assert!(std::fs::read(&small_src).unwrap() == std::fs::read(&small_back).unwrap());

    // fio randwrite with crc32c verification; one block server is killed half-way through a
    // second run, and fio sees no error.
    let fio = |volume: &str, size: &str| {
        let mut c = Command::new("fio");
        c.args([
            &format!("--name={volume}"),
            "--ioengine=nbd",
            &format!("--uri={}", gw.uri(volume)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
        ]);
        // fio leaves verify state files in its working directory.
        c.current_dir(f.dir.path());
        c
    };
    let out = run(&mut fio("small", "32M"));
    assert!(out.contains("err= 0"), "{out}");
    // Several seconds of writes, then the verify pass; the kill lands in the writes.
    let mut during = fio("busy", "128M")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        during.try_wait().unwrap().is_none(),
        "fio still running at the kill"
    );
    f.blocks.kill(3);
    let out = during.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("err= 0"),
        "fio during a server loss: {text}\n{}",
        gw.logs()
    );
    // The operator's view: the lost server, each volume's health.
    let status = continuum(&ep, &["status"]);
    assert!(
        status.contains("volumes: 3") && status.contains("busy"),
        "{status}"
    );
    let show = continuum(&ep, &["volume", "show", "small"]);
    assert!(show.contains("2+1") && show.contains("health"), "{show}");
    let mut gw = gw;
    gw.stop();
    assert!(gw.logs().contains("detached"), "{}", gw.logs());
}

/// A CA and a server certificate for 127.0.0.1 in `dir` (QEMU's tls-creds-x509 layout:
/// ca-cert.pem, server-cert.pem, server-key.pem), plus a client certificate pair.
fn make_certs(dir: &Path) {
    let sh = |script: &str| run(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
          -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN=continuum-test-ca \
          -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
        for who in server client; do
          openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout $who-key.pem -out $who.csr -subj /CN=$who 2>/dev/null
          if [ $who = server ]; then eku=serverAuth; else eku=clientAuth; fi
          printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=%s\\nbasicConstraints=CA:FALSE\\n' $eku > $who.ext
          openssl x509 -req -in $who.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
            -out $who-cert.pem -days 2 -extfile $who.ext 2>/dev/null
        done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_negotiated_with_qemu_and_required_when_configured() {
    let f = fabric().await;
    let ep = f.meta_ep.clone();
    continuum(&ep, &["volume", "create", "secret", "--size", "64M"]);
    let certs = f.dir.path().join("pki");
    std::fs::create_dir(&certs).unwrap();
    make_certs(&certs);
    let pem = |n: &str| format!("{}", certs.join(n).display());
    let gw = Gateway::start(
        f.dir.path(),
        "gw-tls",
        &ep,
        &[
            &format!("--tls-cert={}", pem("server-cert.pem")),
            &format!("--tls-key={}", pem("server-key.pem")),
            &format!("--tls-ca={}", pem("ca-cert.pem")),
            "--tls-required",
        ],
    );
    // QEMU with X.509 credentials (and a client certificate, which this gateway demands).
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=secret,tls-creds=tls0",
        gw.port
    );
    let out = run(Command::new("qemu-io")
        .args(["--object", &creds, "--image-opts", &image])
        .args(["-c", "write -P 0x42 4096 65536", "-c", "flush"])
        .args(["-c", "read -P 0x42 4096 65536"]));
    assert!(!out.contains("verification failed"), "{out}");
    let info =
        run(Command::new("qemu-img").args(["info", "--object", &creds, "--image-opts", &image]));
    assert!(info.contains("64 MiB"), "{info}");
    // A plain client is refused (TLS required), and so is one without a client certificate.
    let plain = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 512", &gw.tcp_uri("secret")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(
        !plain.status.success() && err.contains("TLS"),
        "plain client refused: {err}"
    );
    let no_cert = certs.join("no-client-cert");
    std::fs::create_dir(&no_cert).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), no_cert.join("ca-cert.pem")).unwrap();
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        no_cert.display()
    );
    let anonymous = Command::new("qemu-io")
        .args([
            "--object",
            &creds,
            "--image-opts",
            &image,
            "-c",
            "read 0 512",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&anonymous.stderr);
    assert!(
        !anonymous.status.success(),
        "client without a certificate refused"
    );
    assert!(
        gw.logs().contains("TLS handshake failed"),
        "{err}\n{}",
        gw.logs()
    );
    // libnbd over TLS sees the export and knows it is encrypted.
    let uri = format!(
        "nbds://127.0.0.1:{}/secret?tls-certificates={}",
        gw.port,
        certs.display()
    );
    // `--is tls` exits 0 only when the connection is encrypted.
    run(Command::new("nbdinfo").args(["--is", "tls", &uri]));
}

/// Boots the test guest (scripts/guest-image.sh) under TCG with `export` of the gateway as its
/// virtio disk and returns what it printed on the serial console.
fn boot_guest(gw: &Gateway, export: &str, act: &str) -> String {
    let image = run(&mut Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/guest-image.sh"
    )));
    let image = PathBuf::from(image.trim());
    let blockdev = format!(
        "driver=nbd,node-name=disk0,server.type=unix,server.path={},export={export},reconnect-delay=10",
        gw.socket.display()
    );
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .args([
            "-append",
            &format!("console=ttyS0 panic=-1 quiet continuum.act={act}"),
        ])
        .args([
            "-blockdev",
            &blockdev,
            "-device",
            "virtio-blk-pci,drive=disk0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // TCG boots in about 10 s here; a guest that hangs is killed after 3 minutes.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("CONTINUUM-GUEST-DONE"),
        "the guest ran to the end: {text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcg_guest_boots_with_a_volume_as_its_disk_and_finds_its_marker_again() {
    let f = fabric().await;
    let ep = f.meta_ep.clone();
    continuum(&ep, &["volume", "create", "vm-disk", "--size", "256M"]);
    let gw = Gateway::start(f.dir.path(), "gw-vm", &ep, &[]);
    let marker = format!("continuum-{}", std::process::id());
    let first = boot_guest(&gw, "vm-disk", &format!("write:{marker}"));
    assert!(first.contains(&format!("WROTE MARKER:{marker}")), "{first}");
    assert!(!first.contains("NO DISK"), "{first}");
    let second = boot_guest(&gw, "vm-disk", "read");
    assert!(
        second.contains(&format!("READ MARKER:{marker}")),
        "second boot reads the marker: {second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_with_eio_instead_of_hanging_when_too_many_servers_are_lost() {
    let mut f = fabric().await;
    let ep = f.meta_ep.clone();
    continuum(&ep, &["volume", "create", "fragile", "--size", "64M"]);
    let gw = Gateway::start(
        f.dir.path(),
        "gw-lost",
        &ep,
        &["--request-timeout-seconds=5", "--shard-timeout-ms=1000"],
    );
    let uri = gw.uri("fragile");
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x33 0 1M",
        "-c",
        "flush",
        &uri,
    ]));
    assert!(out.contains("wrote"), "{out}");
    // Three of six servers gone, one dead and two paused (SIGSTOP: their connections stay
    // open and simply never answer): a 4+2 stripe has three shards left, k = 4 needed.
    f.blocks.kill(0);
    for i in [2, 4] {
        let pid = f.blocks.children[i].as_ref().unwrap().id().to_string();
        assert!(Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success());
    }
    let start = std::time::Instant::now();
    let read = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x33 0 64k", &uri])
        .output()
        .unwrap();
    let took = start.elapsed();
    let text =
        String::from_utf8_lossy(&read.stdout).to_string() + &String::from_utf8_lossy(&read.stderr);
    assert!(
        text.contains("Input/output error"),
        "an unreadable stripe is EIO to the client: {text}"
    );
    assert!(
        took < Duration::from_secs(60),
        "answered in {took:?}, not left waiting"
    );
    // The gateway is still healthy for what can be served: the export still negotiates.
    let info = run(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(info.trim(), (64u64 << 20).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_volume_is_scrubbed_by_its_gateway() {
    let f = fabric().await;
    let ep = f.meta_ep.clone();
    continuum(&ep, &["volume", "create", "kept", "--size", "16M"]);
    let gw = Gateway::start(
        f.dir.path(),
        "gw-scrub",
        &ep,
        &["--scrub-interval-seconds=1"],
    );
    // One client writes, then keeps the export attached (qemu-io sleeps before it exits).
    let mut holder = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 4M",
            "-c",
            "flush",
            "-c",
            "sleep 6000",
        ])
        .arg(gw.uri("kept"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let scrubbed = common::wait_for(Duration::from_secs(30), || async {
        gw.logs().contains("scrub done").then_some(())
    })
    .await;
    let _ = holder.wait();
    assert!(
        scrubbed.is_some(),
        "the gateway scrubs what it serves: {}",
        gw.logs()
    );
    assert!(
        gw.logs().contains("checksum_errors: 0"),
        "nothing to fix on a healthy volume: {}",
        gw.logs()
    );
}
