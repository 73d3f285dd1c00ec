//! VM images: a raw or qcow2 file imported into a volume (`continuum image import`), and VM
//! disks cloned from an image. The bytes move with `qemu-img convert` through a gateway (an
//! NBD peer like any other), which skips zeros on the thin target and shows progress.

use std::path::Path;
use std::process::Stdio;

use continuum_blockstore::cluster;
use continuum_meta_client::MetaClient;
use continuum_proto::records_pb::{Image, Volume};

use crate::records::{OrchError, Result};

/// A gateway to move bytes through: `unix:PATH` or `HOST:PORT`.
#[derive(Clone, Debug)]
pub struct Nbd(pub String);

impl Nbd {
    /// The NBD URI of `export` on this gateway.
    pub fn uri(&self, export: &str) -> String {
        match self.0.strip_prefix("unix:") {
            Some(path) => format!("nbd+unix:///{export}?socket={path}"),
            None => format!("nbd://{}/{export}", self.0),
        }
    }
}

/// What `qemu-img info` says about a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    pub format: String,
    pub virtual_size: u64,
}

pub async fn file_info(path: &Path) -> Result<FileInfo> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .await
        .map_err(|e| OrchError::Invalid(format!("running qemu-img (install qemu-utils): {e}")))?;
    if !out.status.success() {
        return Err(OrchError::Invalid(format!(
            "{} is not a disk image qemu-img reads: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| OrchError::Invalid(format!("qemu-img info: {e}")))?;
    Ok(FileInfo {
        format: v["format"].as_str().unwrap_or("raw").to_string(),
        virtual_size: v["virtual-size"].as_u64().unwrap_or(0),
    })
}

/// `qemu-img convert` from `source` (a file or NBD URI) into the NBD URI `target`, skipping
/// zeros (the target is a fresh thin volume), with qemu-img's progress on the terminal when
/// `progress`.
async fn convert(source: &str, format: &str, target: &str, progress: bool) -> Result<()> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args([
        "convert",
        "-n",
        "--target-is-zero",
        "-f",
        format,
        "-O",
        "raw",
    ]);
    if progress {
        cmd.arg("-p");
    }
    let out = cmd
        .args([source, target])
        .stdout(if progress {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| OrchError::Invalid(format!("running qemu-img (install qemu-utils): {e}")))?;
    if !out.status.success() {
        return Err(OrchError::Invalid(format!(
            "qemu-img convert {source} → {target}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// How long deleting a half-written volume may take.
const CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn round_up_4k(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

/// Imports `file` as image `name`: a volume of its virtual size (EC `profile`) holding its raw
/// bytes. On failure the half-written volume is deleted again.
pub async fn import(
    meta: &MetaClient,
    file: &Path,
    name: &str,
    profile: continuum_blockstore::ec::Profile,
    nbd: &Nbd,
    progress: bool,
) -> Result<Image> {
    if meta.record::<Image>(name).await?.is_some() {
        return Err(OrchError::Invalid(format!("image {name:?} already exists")));
    }
    let info = file_info(file).await?;
    if info.virtual_size == 0 {
        return Err(OrchError::Invalid(format!("{} is empty", file.display())));
    }
    let volume = format!("image-{name}");
    cluster::create_volume(
        meta,
        &volume,
        round_up_4k(info.virtual_size),
        profile,
        cluster::DEFAULT_UNIT_BYTES,
    )
    .await
    .map_err(|e| OrchError::Invalid(e.to_string()))?;
    let src = file.display().to_string();
    if let Err(e) = convert(&src, &info.format, &nbd.uri(&volume), progress).await {
        let _ = cluster::delete_volume(meta, &volume, CLEANUP_TIMEOUT).await;
        return Err(e);
    }
    let image = Image {
        name: name.into(),
        volume,
        size_bytes: info.virtual_size,
        source: std::fs::canonicalize(file)
            .unwrap_or_else(|_| file.to_path_buf())
            .display()
            .to_string(),
        source_format: info.format,
        imported_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        ..Default::default()
    };
    meta.create_record(&image).await?;
    Ok(image)
}

/// Creates volume `volume` (at least the image's size; `size` may grow it) holding a copy of
/// image `image`.
pub async fn clone_image(
    meta: &MetaClient,
    image: &str,
    volume: &str,
    size: Option<u64>,
    nbd: &Nbd,
) -> Result<()> {
    let Some(img) = meta.record::<Image>(image).await? else {
        return Err(OrchError::NoSuchImage(image.into()));
    };
    let img = img.record;
    let Some(src) = meta.record::<Volume>(&img.volume).await? else {
        return Err(OrchError::NoSuchVolume(img.volume));
    };
    let size = round_up_4k(size.unwrap_or(0).max(img.size_bytes));
    let profile = cluster::spec_of(&src.record)
        .map_err(|e| OrchError::Invalid(e.to_string()))?
        .profile;
    cluster::create_volume(meta, volume, size, profile, cluster::DEFAULT_UNIT_BYTES)
        .await
        .map_err(|e| OrchError::Invalid(e.to_string()))?;
    if let Err(e) = convert(&nbd.uri(&img.volume), "raw", &nbd.uri(volume), false).await {
        let _ = cluster::delete_volume(meta, volume, CLEANUP_TIMEOUT).await;
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris_for_unix_and_tcp_gateways() {
        assert_eq!(
            Nbd("unix:/run/gw.sock".into()).uri("img"),
            "nbd+unix:///img?socket=/run/gw.sock"
        );
        assert_eq!(
            Nbd("10.0.0.1:10809".into()).uri("img"),
            "nbd://10.0.0.1:10809/img"
        );
        assert_eq!(round_up_4k(1), 4096);
        assert_eq!(round_up_4k(8192), 8192);
    }
}
