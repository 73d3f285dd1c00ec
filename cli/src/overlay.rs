//! `continuum overlay`: the WireGuard-protocol overlay daemon, stand-alone from a wg-quick-style
//! file for now (control through meta comes next: docs/plans/issue-6.md), and `continuum
//! overlay genkey|pubkey` for keys in WireGuard's format.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use continuum_overlay::config::Config;
use continuum_overlay::driver::Overlay;
use continuum_overlay::keys;

#[derive(Subcommand, Debug)]
pub enum OverlayCommand {
    /// Run the overlay on a TUN device from a wg-quick-style config file.
    Run(RunArgs),
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The config file ([Interface] and [Peer] sections, as wg-quick reads).
    #[arg(long)]
    config: PathBuf,
    /// Name of the TUN device to create.
    #[arg(long, default_value = "cnt0")]
    tun: String,
}

pub async fn overlay(c: OverlayCommand) -> anyhow::Result<()> {
    match c {
        OverlayCommand::Genkey => {
            let mut k = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
            println!("{}", keys::encode(&k));
            Ok(())
        }
        OverlayCommand::Pubkey => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            let private = keys::decode(&text)?;
            let public = continuum_overlay::device::Device::new(private, 0).public_key();
            println!("{}", keys::encode(&public));
            Ok(())
        }
        OverlayCommand::Run(args) => {
            let text = std::fs::read_to_string(&args.config)
                .with_context(|| format!("reading {}", args.config.display()))?;
            let cfg =
                Config::parse(&text).with_context(|| format!("in {}", args.config.display()))?;
            let seed = rand::random();
            let ov = Overlay::start(&cfg, &args.tun, seed).await?;
            tracing::info!(
                tun = %args.tun,
                port = ov.local_port()?,
                public_key = %keys::encode(&ov.device.public_key()),
                peers = cfg.peers.len(),
                "overlay up"
            );
            ov.run(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
            tracing::info!("overlay stopped");
            Ok(())
        }
    }
}
