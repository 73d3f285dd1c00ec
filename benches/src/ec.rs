//! `continuum-bench ec`: erasure-coding speed per core — Continuum's codec
//! (`continuum_blockstore::ec`, reed-solomon-erasure) against Intel ISA-L (Debian
//! `libisal-dev`), same profiles, same shard size, same machine, in one run.
//!
//! Figures are GB/s of stripe *data* (k × shard bytes) per second on one core, for encoding
//! all parity and for reconstructing min(m, k) lost data shards. The ISA-L side is a small C
//! program compiled at run time against the system library (`cc -O2 -lisal`); without
//! libisal-dev it is reported as unavailable and only Continuum is measured.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use continuum_blockstore::ec::{Codec, Profile};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct EcArgs {
    /// Profiles to measure, as DATA+PARITY.
    #[arg(long, default_value = "4+2,8+3", value_delimiter = ',')]
    profiles: Vec<String>,
    /// Bytes per shard per operation, in KiB.
    #[arg(long, default_value_t = 256)]
    shard_kib: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Write the results as JSON here.
    #[arg(long, default_value = "bench-results/ec.json")]
    json: PathBuf,
    /// Measure Continuum only.
    #[arg(long)]
    skip_isal: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    profile: String,
    target: String,
    encode_gbps: f64,
    reconstruct_gbps: f64,
}

fn parse_profile(s: &str) -> Result<Profile> {
    let (k, m) = s
        .split_once('+')
        .with_context(|| format!("profile {s:?} is not DATA+PARITY"))?;
    Ok(Profile::new(k.trim().parse()?, m.trim().parse()?)?)
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn measure(seconds: f64, mut op: impl FnMut()) -> f64 {
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed() < budget {
        op();
        ops += 1;
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

fn continuum(profile: Profile, shard: usize, seconds: f64) -> Result<(f64, f64)> {
    let codec = Codec::new(profile)?;
    let data: Vec<Vec<u8>> = (0..profile.data)
        .map(|i| pseudo_random(shard, i as u64 + 1))
        .collect();
    let mut parity = vec![vec![0u8; shard]; profile.parity];
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let enc_ops = measure(seconds, || {
        let mut p: Vec<&mut [u8]> = parity.iter_mut().map(Vec::as_mut_slice).collect();
        codec.encode(&refs, &mut p).expect("encode");
    });
    let full: Vec<Vec<u8>> = data.iter().cloned().chain(parity.iter().cloned()).collect();
    let lost = profile.parity.min(profile.data);
    // The first `lost` data shards are gone; the codec rebuilds them into reused buffers.
    let present: Vec<bool> = (0..profile.width()).map(|i| i >= lost).collect();
    let mut bufs = full.clone();
    let mut check = Ok(());
    let rec_ops = measure(seconds, || {
        let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
        codec
            .reconstruct_in_place(&mut refs, &present)
            .expect("reconstruct");
    });
    if bufs[..lost] != full[..lost] {
        check = Err(anyhow::anyhow!("reconstruction returned wrong data"));
    }
    check?;
    let bytes = (profile.data * shard) as f64;
    Ok((enc_ops * bytes / 1e9, rec_ops * bytes / 1e9))
}

const ISAL_SOURCE: &str = r#"
#include <isa-l/erasure_code.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
  if (argc != 5) return 2;
  int k = atoi(argv[1]), m = atoi(argv[2]), len = atoi(argv[3]); double secs = atof(argv[4]);
  int n = k + m, lost = m < k ? m : k, i, j;
  unsigned char *frags[64], *rec[64], *src[64];
  unsigned long long x = 88172645463325252ULL;
  for (i = 0; i < n; i++) { frags[i] = aligned_alloc(64, len); for (j = 0; j < len; j++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; frags[i][j] = (unsigned char)x; } }
  unsigned char *a = malloc(n * k), *g = malloc(32 * k * m);
  gf_gen_cauchy1_matrix(a, n, k);
  ec_init_tables(k, m, &a[k * k], g);
  long it = 0; double t0 = now(), t;
  do { ec_encode_data(len, k, m, g, frags, &frags[k]); it++; } while ((t = now() - t0) < secs);
  double enc = (double)it * k * len / t / 1e9;
  unsigned char *b = malloc(k * k), *d = malloc(k * k), *dm = malloc(k * lost), *g2 = malloc(32 * k * lost);
  for (i = lost; i < lost + k; i++) { for (j = 0; j < k; j++) b[k * (i - lost) + j] = a[k * i + j]; src[i - lost] = frags[i]; }
  if (gf_invert_matrix(b, d, k) < 0) { fprintf(stderr, "singular matrix\n"); return 1; }
  for (i = 0; i < lost; i++) for (j = 0; j < k; j++) dm[k * i + j] = d[k * i + j];
  ec_init_tables(k, lost, dm, g2);
  for (i = 0; i < lost; i++) rec[i] = aligned_alloc(64, len);
  it = 0; t0 = now();
  do { ec_encode_data(len, k, lost, g2, src, rec); it++; } while ((t = now() - t0) < secs);
  double rc = (double)it * k * len / t / 1e9;
  for (i = 0; i < lost; i++) if (memcmp(rec[i], frags[i], len) != 0) { fprintf(stderr, "wrong reconstruction\n"); return 1; }
  printf("%f %f\n", enc, rc);
  return 0;
}
"#;

fn build_isal(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("isal_ec.c");
    let bin = dir.join("isal_ec");
    std::fs::write(&src, ISAL_SOURCE)?;
    let out = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg("-lisal")
        .output()
        .context("running cc")?;
    if !out.status.success() {
        bail!(
            "cannot build the ISA-L side (is libisal-dev installed?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(bin)
}

fn isal(bin: &Path, profile: Profile, shard: usize, seconds: f64) -> Result<(f64, f64)> {
    let out = Command::new(bin)
        .args([
            profile.data.to_string(),
            profile.parity.to_string(),
            shard.to_string(),
            seconds.to_string(),
        ])
        .output()
        .context("running the ISA-L side")?;
    if !out.status.success() {
        bail!(
            "ISA-L side failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next()) {
        (Some(Ok(e)), Some(Ok(r))) => Ok((e, r)),
        _ => bail!("unexpected ISA-L output {text:?}"),
    }
}

pub fn run(args: EcArgs) -> Result<()> {
    let shard = args.shard_kib * 1024;
    let profiles: Vec<Profile> = args
        .profiles
        .iter()
        .map(|p| parse_profile(p))
        .collect::<Result<_>>()?;
    let dir = tempfile::tempdir()?;
    let isal_bin = if args.skip_isal {
        None
    } else {
        match build_isal(dir.path()) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("[ec] ISA-L unavailable: {e:#}");
                None
            }
        }
    };
    let mut rows = Vec::new();
    println!(
        "ec: GB/s of stripe data per core, {} KiB shards",
        args.shard_kib
    );
    println!(
        "{:<7} {:<10} {:>10} {:>14}",
        "profile", "target", "encode", "reconstruct"
    );
    for p in profiles {
        let name = format!("{}+{}", p.data, p.parity);
        eprintln!("[ec] {name}: continuum");
        let (e, r) = continuum(p, shard, args.seconds)?;
        println!("{name:<7} {:<10} {e:>10.2} {r:>14.2}", "continuum");
        rows.push(Row {
            profile: name.clone(),
            target: "continuum".into(),
            encode_gbps: e,
            reconstruct_gbps: r,
        });
        if let Some(bin) = &isal_bin {
            eprintln!("[ec] {name}: isa-l");
            let (ie, ir) = isal(bin, p, shard, args.seconds)?;
            println!("{name:<7} {:<10} {ie:>10.2} {ir:>14.2}", "isa-l");
            println!(
                "{name:<7} {:<10} {:>9.2}x {:>13.2}x",
                "ratio",
                e / ie,
                r / ir
            );
            rows.push(Row {
                profile: name,
                target: "isa-l".into(),
                encode_gbps: ie,
                reconstruct_gbps: ir,
            });
        }
    }
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&rows)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    eprintln!("[ec] results written to {}", args.json.display());
    Ok(())
}
