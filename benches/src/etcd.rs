//! The etcd side of the meta benchmark: a 3-member etcd 3.4 cluster on loopback, driven over
//! etcd's own v3 gRPC API (the stubs come from `proto/etcd_rpc.proto`).
//!
//! etcd runs with its default Raft timing (100 ms heartbeat, 1 s election timeout) and default
//! durability (WAL fsync on every commit): the benchmark compares against etcd as operators
//! deploy it, not a tuned one.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use bytes::Bytes;
use tonic::transport::Channel;

use crate::cluster::{connect_channel, MemberSpec, PortAllocator};
use crate::meta::{KvClient, KvTarget, MemberStatus};

/// The generated etcd v3 messages and client stubs.
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient as KvStub;
use pb::maintenance_client::MaintenanceClient as MaintenanceStub;

/// Members of the benchmark cluster.
const MEMBERS: usize = 3;
/// Keeps the benchmark cluster from ever joining members of another etcd on the machine.
const CLUSTER_TOKEN: &str = "continuum-bench";

struct EtcdMember {
    name: String,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    log_path: PathBuf,
}

impl EtcdMember {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// A 3-member etcd cluster laid out under one directory, not yet started.
pub struct EtcdTarget {
    bin: PathBuf,
    version: Option<String>,
    members: Vec<EtcdMember>,
    client_urls: Vec<String>,
}

impl EtcdTarget {
    pub fn new(bin: &Path, dir: &Path, ports: &mut PortAllocator) -> Result<Self> {
        let version = etcd_version(bin)?;
        let mut members = Vec::with_capacity(MEMBERS);
        for n in 1..=MEMBERS {
            let name = format!("e{n}");
            members.push(EtcdMember {
                data_dir: dir.join(format!("{name}.data")),
                log_path: dir.join(format!("{name}.log")),
                client_port: ports.take()?,
                peer_port: ports.take()?,
                name,
            });
        }
        let client_urls = members.iter().map(EtcdMember::client_url).collect();
        Ok(Self {
            bin: bin.to_path_buf(),
            version: Some(version),
            members,
            client_urls,
        })
    }
}

/// The first line of `etcd --version`, e.g. `etcd Version: 3.4.23`; also proves the binary runs.
fn etcd_version(bin: &Path) -> Result<String> {
    let output = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "running {} --version (is etcd-server installed?)",
                bin.display()
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    if !output.status.success() || first.is_empty() {
        anyhow::bail!("{} --version failed: {}", bin.display(), output.status);
    }
    Ok(first)
}

/// The command line of one etcd member (etcd 3.4 flags).
fn member_spec(bin: &Path, me: &EtcdMember, initial_cluster: &str) -> MemberSpec {
    let flags: [(&str, OsString); 11] = [
        ("--name", me.name.clone().into()),
        ("--data-dir", me.data_dir.clone().into()),
        ("--listen-client-urls", me.client_url().into()),
        ("--advertise-client-urls", me.client_url().into()),
        ("--listen-peer-urls", me.peer_url().into()),
        ("--initial-advertise-peer-urls", me.peer_url().into()),
        ("--initial-cluster", initial_cluster.into()),
        ("--initial-cluster-state", "new".into()),
        ("--initial-cluster-token", CLUSTER_TOKEN.into()),
        ("--logger", "zap".into()),
        ("--log-level", "warn".into()),
    ];
    let args = flags
        .into_iter()
        .flat_map(|(flag, value)| [OsString::from(flag), value])
        .collect();
    MemberSpec {
        name: format!("etcd/{}", me.name),
        program: bin.to_path_buf(),
        args,
        log_path: me.log_path.clone(),
    }
}

impl KvTarget for EtcdTarget {
    type Client = EtcdClient;

    fn name(&self) -> &'static str {
        "etcd"
    }

    fn version(&self) -> Option<String> {
        self.version.clone()
    }

    fn member_specs(&self) -> Vec<MemberSpec> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        self.members
            .iter()
            .map(|m| member_spec(&self.bin, m, &initial_cluster))
            .collect()
    }

    fn client_urls(&self) -> &[String] {
        &self.client_urls
    }

    async fn connect(url: &str) -> Result<EtcdClient> {
        let channel = connect_channel(url).await?;
        Ok(EtcdClient::new(channel))
    }
}

/// One connection to one etcd member.
#[derive(Clone)]
pub struct EtcdClient {
    kv: KvStub<Channel>,
    maintenance: MaintenanceStub<Channel>,
}

impl EtcdClient {
    fn new(channel: Channel) -> Self {
        Self {
            kv: KvStub::new(channel.clone()),
            maintenance: MaintenanceStub::new(channel),
        }
    }
}

impl KvClient for EtcdClient {
    async fn put(&mut self, key: Bytes, value: Bytes) -> Result<()> {
        let request = pb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        };
        self.kv.put(request).await.context("etcd Put")?;
        Ok(())
    }

    async fn get(&mut self, key: Bytes) -> Result<Option<Bytes>> {
        let request = pb::RangeRequest {
            key: key.into(),
            serializable: false,
            ..Default::default()
        };
        let response = self.kv.range(request).await.context("etcd Range")?;
        Ok(response
            .into_inner()
            .kvs
            .into_iter()
            .next()
            .map(|kv| Bytes::from(kv.value)))
    }

    async fn status(&mut self) -> Result<MemberStatus> {
        let response = self
            .maintenance
            .status(pb::StatusRequest {})
            .await
            .context("etcd Status")?
            .into_inner();
        let member_id = response
            .header
            .map(|h| h.member_id)
            .context("etcd Status response without header")?;
        Ok(MemberStatus {
            member_id,
            leader_id: response.leader,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_command_line_names_every_peer() {
        let dir = Path::new("/tmp/x");
        let mut ports = PortAllocator::new(40000);
        let target = EtcdTarget {
            bin: PathBuf::from("/usr/bin/etcd"),
            version: None,
            members: (1..=3)
                .map(|n| EtcdMember {
                    name: format!("e{n}"),
                    data_dir: dir.join(format!("e{n}.data")),
                    client_port: ports.take().unwrap(),
                    peer_port: ports.take().unwrap(),
                    log_path: dir.join(format!("e{n}.log")),
                })
                .collect(),
            client_urls: Vec::new(),
        };
        let specs = target.member_specs();
        assert_eq!(specs.len(), 3);
        let line = specs[1].command_line();
        assert!(line.starts_with("/usr/bin/etcd --name e2 "), "{line}");
        assert!(
            line.contains("--initial-cluster e1=http://127.0.0.1:"),
            "{line}"
        );
        assert!(line.contains(",e3=http://127.0.0.1:"), "{line}");
        assert!(line.contains("--initial-cluster-state new"), "{line}");
    }
}
