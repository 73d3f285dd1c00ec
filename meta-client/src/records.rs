//! Typed access to the fabric's records (sites, nodes, volumes, writer leases, overlay peers,
//! hosts, VMs) on top of the KV API, and the writer-lease protocol of DESIGN.md invariant 1.

use continuum_proto::meta::TxnRequest;
use continuum_proto::records::{self as layout, Record, SCHEMA_VERSION};
use continuum_proto::records_pb::{Volume, WriterLease};

use crate::{cmp, op, Error, MetaClient, Result};

/// A record with the revision it was read at (for compare-and-swap updates).
#[derive(Clone, Debug)]
pub struct Versioned<R> {
    pub record: R,
    pub mod_revision: u64,
}

fn decode<R: Record>(key: &[u8], value: &[u8]) -> Result<R> {
    R::decode(value).map_err(|e| Error::CorruptRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl MetaClient {
    /// Reads one record.
    pub async fn record<R: Record>(&self, name: &str) -> Result<Option<Versioned<R>>> {
        let key = layout::key::<R>(name);
        match self.get(key.as_bytes().to_vec()).await? {
            Some(kv) => Ok(Some(Versioned {
                record: decode(&kv.key, &kv.value)?,
                mod_revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    /// Lists every record of a kind, in name order.
    pub async fn records<R: Record>(&self) -> Result<Vec<Versioned<R>>> {
        self.get_prefix(layout::prefix::<R>().into_bytes())
            .await?
            .into_iter()
            .map(|kv| {
                Ok(Versioned {
                    record: decode(&kv.key, &kv.value)?,
                    mod_revision: kv.mod_revision,
                })
            })
            .collect()
    }

    /// Creates a record; fails with `AlreadyExists` if one has that name.
    pub async fn create_record<R: Record>(&self, record: &R) -> Result<u64> {
        self.swap_record(record, 0, 0).await
    }

    /// Writes `record` if the stored one is still at `mod_revision` (0 = absent), optionally
    /// attached to a lease. Returns the new revision.
    pub async fn swap_record<R: Record>(
        &self,
        record: &R,
        mod_revision: u64,
        lease: u64,
    ) -> Result<u64> {
        let mut record = record.clone();
        record.set_schema_version(SCHEMA_VERSION);
        let key = layout::key::<R>(&record.name());
        let resp = self
            .txn(TxnRequest {
                compare: vec![cmp::mod_revision_eq(key.as_bytes(), mod_revision)],
                success: vec![op::put(key.as_bytes(), record.encode_to_vec(), lease)],
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(if mod_revision == 0 {
                Error::AlreadyExists { message: key }
            } else {
                Error::Conflict {
                    message: format!("{key} changed since revision {mod_revision}"),
                }
            });
        }
        Ok(resp.header.map(|h| h.revision).unwrap_or(0))
    }

    /// Writes `record` unconditionally.
    pub async fn put_record<R: Record>(&self, record: &R) -> Result<u64> {
        let mut record = record.clone();
        record.set_schema_version(SCHEMA_VERSION);
        let key = layout::key::<R>(&record.name());
        let r = self.put(key.into_bytes(), record.encode_to_vec()).await?;
        Ok(r.header.map(|h| h.revision).unwrap_or(0))
    }

    pub async fn delete_record<R: Record>(&self, name: &str) -> Result<bool> {
        let r = self.delete(layout::key::<R>(name).into_bytes()).await?;
        Ok(r.deleted > 0)
    }

    /// Takes the writer lease of volume `volume_name` for `holder`: in one transaction, bumps the
    /// volume's epoch and records the lease (attached to a meta lease of `ttl_seconds`, which the
    /// caller must keep alive). Fails with `Conflict` while another holder's lease is alive.
    ///
    /// Invariant (DESIGN.md 1): the epoch is bumped in meta before the holder's first write, and
    /// two holders never get the same epoch.
    pub async fn acquire_writer_lease(
        &self,
        volume_name: &str,
        holder: &str,
        ttl_seconds: u64,
    ) -> Result<WriterLease> {
        let Some(vol) = self.record::<Volume>(volume_name).await? else {
            return Err(Error::NotFound {
                message: format!("volume {volume_name}"),
            });
        };
        let lease = self.lease_grant(ttl_seconds).await?.id;
        let mut volume = vol.record.clone();
        volume.epoch += 1;
        volume.schema_version = SCHEMA_VERSION;
        let wl = WriterLease {
            schema_version: SCHEMA_VERSION,
            volume_id: volume.id,
            holder: holder.to_string(),
            epoch: volume.epoch,
            lease_id: lease,
        };
        let vkey = layout::key::<Volume>(volume_name);
        let lkey = layout::key::<WriterLease>(&wl.name());
        let resp = self
            .txn(TxnRequest {
                compare: vec![
                    cmp::mod_revision_eq(vkey.as_bytes(), vol.mod_revision),
                    cmp::absent(lkey.as_bytes()),
                ],
                success: vec![
                    op::put(vkey.as_bytes(), volume.encode_to_vec(), 0),
                    op::put(lkey.as_bytes(), wl.encode_to_vec(), lease),
                ],
                failure: vec![],
            })
            .await;
        match resp {
            Ok(r) if r.succeeded => Ok(wl),
            Ok(_) => {
                let _ = self.lease_revoke(lease).await;
                Err(Error::Conflict {
                    message: format!("volume {volume_name} has a live writer or changed; retry"),
                })
            }
            Err(e) => {
                let _ = self.lease_revoke(lease).await;
                Err(e)
            }
        }
    }
}

use prost::Message as _;
