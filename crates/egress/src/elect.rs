//! One sender per platform at a time.
//!
//! The pipeline's durable consumer would hand any message to any replica,
//! so two replicas could deliver one chat's messages out of order and
//! per-process pacing would let every replica spend the platform's whole
//! rate budget. [`run_elected`] runs the pipeline only in the replica that
//! holds a lease in KV; the others stand by and take over within about the
//! lease's ttl after it stops (at once) or dies. The sender's per-chat
//! ordering is then the global order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hg_bus::Bus;
use hg_bus::lease::Lease;
use tokio_util::sync::CancellationToken;

use crate::{EgressConfig, EgressError, Platform};

/// Where the sender lease lives and how it behaves.
#[derive(Debug, Clone)]
pub struct Election {
    /// KV bucket of the lease.
    pub bucket: String,
    /// Lease key.
    pub key: String,
    /// A dead sender is replaced within about this long.
    pub ttl: Duration,
    /// A new sender waits this long before its first send (for example so
    /// its rate limiter does not start below the previous sender's).
    pub warmup: Duration,
}

impl Election {
    /// The default election of `platform`: bucket `hg_egress_leases`, key
    /// the platform's name, 5 s ttl, no warm-up.
    pub fn for_platform(platform: &str) -> Election {
        Election {
            bucket: "hg_egress_leases".into(),
            key: hg_proto::subject::token(platform),
            ttl: Duration::from_secs(5),
            warmup: Duration::ZERO,
        }
    }
}

/// Runs the egress pipeline while this replica holds the sender lease,
/// until `shutdown`.
pub async fn run_elected(
    bus: Bus,
    platform: Arc<dyn Platform>,
    config: EgressConfig,
    election: Election,
    shutdown: CancellationToken,
) -> Result<(), EgressError> {
    let owner = format!(
        "{}-egress-{}",
        platform.name(),
        uuid::Uuid::new_v4().simple()
    );
    let leases = Lease::open(&bus, &election.bucket, election.ttl, &owner).await?;
    let name = platform.name().to_owned();
    tracing::info!(platform = %name, owner = %owner, "egress started, waiting for the sender lease");
    while !shutdown.is_cancelled() {
        match leases.acquire(&election.key).await.map(|c| c.revision()) {
            Ok(Some(revision)) => {
                tracing::info!(platform = %name, owner = %owner, "sender lease taken, delivering");
                metrics::gauge!("hg_egress_sender", "platform" => name.clone()).set(1.0);
                let revision = AtomicU64::new(revision);
                let active = shutdown.child_token();
                let pipeline = async {
                    tokio::select! {
                        () = active.cancelled() => return Ok(()),
                        () = tokio::time::sleep(election.warmup) => {}
                    }
                    crate::run(
                        bus.clone(),
                        Arc::clone(&platform),
                        config.clone(),
                        active.clone(),
                    )
                    .await
                };
                tokio::pin!(pipeline);
                let result = tokio::select! {
                    result = &mut pipeline => result,
                    () = leases.hold(&election.key, &revision) => {
                        tracing::warn!(platform = %name, "sender lease lost, handing over");
                        active.cancel();
                        pipeline.await
                    }
                };
                metrics::gauge!("hg_egress_sender", "platform" => name.clone()).set(0.0);
                // Hand over at once rather than after the ttl.
                let _ = leases
                    .release(&election.key, revision.load(Ordering::Relaxed))
                    .await;
                result?;
                if shutdown.is_cancelled() {
                    break;
                }
            }
            Ok(None) => tracing::trace!(platform = %name, "another replica sends"),
            Err(e) => tracing::warn!(platform = %name, error = %e, "cannot take the sender lease"),
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(election.ttl / 3) => {}
        }
    }
    Ok(())
}
