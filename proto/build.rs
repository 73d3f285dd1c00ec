fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure().compile(
        &[
            "proto/meta.proto",
            "proto/meta_internal.proto",
            "proto/records.proto",
            "proto/block.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
