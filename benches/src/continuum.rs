//! The Continuum side of the meta benchmark: three `continuum meta` processes on loopback,
//! driven over the `continuum.meta.v1.Meta` gRPC API with the stubs from `continuum-proto`.
//!
//! The member command line is built in one place, [`member_spec`], so that it follows the CLI
//! of the `continuum` binary with a one-function change.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bytes::Bytes;
use continuum_proto::meta::meta_client::MetaClient as MetaStub;
use continuum_proto::meta::{PutRequest, RangeRequest, StatusRequest};
use tonic::transport::Channel;

use crate::cluster::{connect_channel, MemberSpec, PortAllocator};
use crate::meta::{KvClient, KvTarget, MemberStatus};

/// Members of the benchmark cluster; Raft ids are 1..=MEMBERS.
const MEMBERS: u64 = 3;

struct ContinuumMember {
    id: u64,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    log_path: PathBuf,
}

impl ContinuumMember {
    fn client_addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }
}

/// A 3-member Continuum meta cluster laid out under one directory, not yet started.
pub struct ContinuumTarget {
    bin: PathBuf,
    members: Vec<ContinuumMember>,
    client_urls: Vec<String>,
}

impl ContinuumTarget {
    pub fn new(bin: &Path, dir: &Path, ports: &mut PortAllocator) -> Result<Self> {
        if !bin.is_file() {
            anyhow::bail!(
                "continuum binary not found at {} (build it with `cargo build -p continuum`, \
                 pass --continuum-bin, or use --skip-continuum)",
                bin.display()
            );
        }
        let mut members = Vec::new();
        for id in 1..=MEMBERS {
            members.push(ContinuumMember {
                id,
                data_dir: dir.join(format!("m{id}.data")),
                log_path: dir.join(format!("m{id}.log")),
                client_port: ports.take()?,
                peer_port: ports.take()?,
                metrics_port: ports.take()?,
            });
        }
        let client_urls = members
            .iter()
            .map(|m| format!("http://{}", m.client_addr()))
            .collect();
        Ok(Self {
            bin: bin.to_path_buf(),
            members,
            client_urls,
        })
    }
}

/// The `continuum meta` command line of one member. This is the only place that knows the
/// daemon's flags; adjust it here if the CLI changes.
fn member_spec(bin: &Path, me: &ContinuumMember, initial_cluster: &str) -> MemberSpec {
    let flags: [(&str, OsString); 6] = [
        ("--id", me.id.to_string().into()),
        ("--data-dir", me.data_dir.clone().into()),
        ("--listen-client", me.client_addr().into()),
        ("--listen-peer", me.peer_addr().into()),
        ("--initial-cluster", initial_cluster.into()),
        (
            "--metrics-addr",
            format!("127.0.0.1:{}", me.metrics_port).into(),
        ),
    ];
    let mut args = vec![OsString::from("meta")];
    args.extend(
        flags
            .into_iter()
            .flat_map(|(flag, value)| [OsString::from(flag), value]),
    );
    MemberSpec {
        name: format!("continuum/{}", me.id),
        program: bin.to_path_buf(),
        args,
        log_path: me.log_path.clone(),
    }
}

/// `1=peer/client,2=peer/client,3=peer/client`.
fn initial_cluster(members: &[ContinuumMember]) -> String {
    members
        .iter()
        .map(|m| format!("{}={}/{}", m.id, m.peer_addr(), m.client_addr()))
        .collect::<Vec<_>>()
        .join(",")
}

impl KvTarget for ContinuumTarget {
    type Client = ContinuumClient;

    fn name(&self) -> &'static str {
        "continuum"
    }

    fn version(&self) -> Option<String> {
        None
    }

    fn member_specs(&self) -> Vec<MemberSpec> {
        let initial_cluster = initial_cluster(&self.members);
        self.members
            .iter()
            .map(|m| member_spec(&self.bin, m, &initial_cluster))
            .collect()
    }

    fn client_urls(&self) -> &[String] {
        &self.client_urls
    }

    async fn connect(url: &str) -> Result<ContinuumClient> {
        let channel = connect_channel(url).await?;
        Ok(ContinuumClient {
            meta: MetaStub::new(channel),
        })
    }
}

/// One connection to one Continuum meta member.
#[derive(Clone)]
pub struct ContinuumClient {
    meta: MetaStub<Channel>,
}

impl KvClient for ContinuumClient {
    async fn put(&mut self, key: Bytes, value: Bytes) -> Result<()> {
        let request = PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        };
        self.meta.put(request).await.context("continuum Put")?;
        Ok(())
    }

    async fn get(&mut self, key: Bytes) -> Result<Option<Bytes>> {
        let request = RangeRequest {
            key: key.into(),
            serializable: false,
            ..Default::default()
        };
        let response = self.meta.range(request).await.context("continuum Range")?;
        Ok(response
            .into_inner()
            .kvs
            .into_iter()
            .next()
            .map(|kv| Bytes::from(kv.value)))
    }

    async fn status(&mut self) -> Result<MemberStatus> {
        let response = self
            .meta
            .status(StatusRequest {})
            .await
            .context("continuum Status")?
            .into_inner();
        Ok(MemberStatus {
            member_id: response.member_id,
            leader_id: response.leader_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_command_line_matches_the_meta_cli() {
        let dir = Path::new("/d");
        let members: Vec<ContinuumMember> = (1..=3)
            .map(|id| ContinuumMember {
                id,
                data_dir: dir.join(format!("m{id}.data")),
                client_port: 7000 + id as u16,
                peer_port: 8000 + id as u16,
                metrics_port: 9000 + id as u16,
                log_path: dir.join(format!("m{id}.log")),
            })
            .collect();
        let cluster = initial_cluster(&members);
        assert_eq!(
            cluster,
            "1=127.0.0.1:8001/127.0.0.1:7001,2=127.0.0.1:8002/127.0.0.1:7002,\
             3=127.0.0.1:8003/127.0.0.1:7003"
        );
        let spec = member_spec(Path::new("/bin/continuum"), &members[1], &cluster);
        assert_eq!(
            spec.command_line(),
            format!(
                "/bin/continuum meta --id 2 --data-dir /d/m2.data --listen-client 127.0.0.1:7002 \
                 --listen-peer 127.0.0.1:8002 --initial-cluster {cluster} \
                 --metrics-addr 127.0.0.1:9002"
            )
        );
    }
}
