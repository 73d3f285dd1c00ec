//! The WAN link's delay line: this machine's kernel has no `sch_netem`, so traffic between the
//! sites is routed through a TUN device in the router namespace, and this relay (a process of
//! its own, `continuum-chaos wan-relay`, started inside that namespace) writes every packet
//! back after a delay, drops some, and — with jitter — reorders them, as netem would.
//!
//! Policy routing in the router sends what one site's bridge forwards to the other site into
//! `wan0`; a packet the relay writes back enters as if received on `wan0` and is routed by
//! the main table to the other bridge. The harness changes the link by writing lines
//! `DELAY_MS JITTER_MS LOSS_PCT` to the relay's stdin (`0 0 0`: a clean link; loss 100: cut).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncBufReadExt;

/// The link's current behaviour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    pub loss_pct: u32,
}

impl Link {
    pub fn line(&self) -> String {
        format!("{} {} {}\n", self.delay_ms, self.jitter_ms, self.loss_pct)
    }

    pub fn parse(line: &str) -> Option<Self> {
        let mut it = line.split_whitespace().map(|x| x.parse::<u64>().ok());
        let (d, j, l) = (it.next()??, it.next()??, it.next()??);
        Some(Self {
            delay_ms: d,
            jitter_ms: j,
            loss_pct: u32::try_from(l.min(100)).ok()?,
        })
    }

    pub fn describe(&self) -> String {
        if self.loss_pct >= 100 {
            return "link cut".into();
        }
        let mut parts = Vec::new();
        if self.delay_ms > 0 || self.jitter_ms > 0 {
            parts.push(format!(
                "{} ms delay ±{} ms (reordering)",
                self.delay_ms, self.jitter_ms
            ));
        }
        if self.loss_pct > 0 {
            parts.push(format!("{}% loss", self.loss_pct));
        }
        if parts.is_empty() {
            "clean".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Runs the relay on TUN device `dev` until stdin closes (the harness went away).
pub async fn relay(dev: &str, seed: u64) -> Result<()> {
    let tun = tokio_tun::Tun::builder()
        .name(dev)
        .mtu(1500)
        .up()
        .build()
        .with_context(|| format!("creating TUN device {dev}"))?
        .into_iter()
        .next()
        .context("no TUN queue")?;
    let tun = Arc::new(tun);
    let link = Arc::new(Mutex::new(Link::default()));
    let control = {
        let link = link.clone();
        async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(new) = Link::parse(&l) {
                    *link.lock().expect("poisoned") = new;
                }
            }
        }
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let forward = async {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = tun.recv(&mut buf).await?;
            let l = *link.lock().expect("poisoned");
            if l.loss_pct > 0 && rng.gen_range(0..100) < l.loss_pct {
                continue;
            }
            let delay = l.delay_ms + rng.gen_range(0..=l.jitter_ms);
            if delay == 0 {
                let _ = tun.send(&buf[..n]).await;
                continue;
            }
            let pkt = buf[..n].to_vec();
            let t = tun.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let _ = t.send(&pkt).await;
            });
        }
        #[allow(unreachable_code)]
        anyhow::Ok(())
    };
    tokio::select! {
        _ = control => Ok(()),
        r = forward => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_round_trip() {
        let l = Link {
            delay_ms: 40,
            jitter_ms: 20,
            loss_pct: 5,
        };
        assert_eq!(Link::parse(&l.line()), Some(l));
        assert_eq!(Link::parse("1 2"), None);
        assert_eq!(Link::parse("1 2 300").map(|l| l.loss_pct), Some(100));
        assert_eq!(Link::default().describe(), "clean");
    }
}
