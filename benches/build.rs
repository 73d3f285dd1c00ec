//! Generates the etcd v3 client stubs the meta benchmark uses to drive the etcd side.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .build_server(false)
        .compile(&["proto/etcd_rpc.proto"], &["proto"])?;
    Ok(())
}
