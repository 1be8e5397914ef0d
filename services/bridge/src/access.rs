//! Who may talk to the agent: `open`, an `allowlist` of platform user ids,
//! or `pairing`, where an unknown user in a direct chat gets a one-time
//! code that an operator approves with `harnessgate pairing approve`.
//!
//! Pending codes live in KV [`PAIRING_BUCKET`] (key = the code), approved
//! users in [`ACCESS_BUCKET`] (key = token of `platform:app:user`).

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use hg_bus::{Bus, BusError};
use hg_proto::subject;
use serde::{Deserialize, Serialize};

/// KV bucket of pending pairing codes.
pub const PAIRING_BUCKET: &str = "hg_pairing";
/// KV bucket of users approved through pairing.
pub const ACCESS_BUCKET: &str = "hg_access";
/// Characters of a pairing code: no 0/O, 1/I/L look-alikes.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
const CODE_LEN: usize = 8;

/// How a route admits senders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// Everyone the route matches.
    #[default]
    Open,
    /// Only the route's `allowlist`.
    Allowlist,
    /// The `allowlist` plus users an operator approved by pairing code.
    Pairing,
}

/// Pairing settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PairingConfig {
    /// How long a code stays valid.
    #[serde(with = "humantime_serde")]
    pub code_ttl: Duration,
    /// Codes waiting for an operator, per app.
    pub max_pending_per_app: usize,
}

impl Default for PairingConfig {
    fn default() -> Self {
        PairingConfig {
            code_ttl: Duration::from_secs(3600),
            max_pending_per_app: 3,
        }
    }
}

/// A code waiting for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingRequest {
    pub code: String,
    pub platform: String,
    pub app_id: String,
    pub user_id: String,
    pub username: String,
    pub display_name: String,
    /// Where to tell the user they were approved.
    pub channel_id: String,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// A user let in by pairing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paired {
    pub platform: String,
    pub app_id: String,
    pub user_id: String,
    pub username: String,
    pub code: String,
    pub approved_ms: i64,
}

/// What pairing says about a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairingStatus {
    Approved,
    /// Waiting; tell the user this code.
    Pending(PairingRequest),
    /// Too many codes waiting for this app.
    Full,
}

/// Pairing codes and approved users in KV.
#[derive(Clone)]
pub struct PairingStore {
    codes: kv::Store,
    access: kv::Store,
}

/// Why a code could not be approved.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    #[error("no pending pairing code {0}")]
    Unknown(String),
    #[error("pairing code {0} has expired; the user must write again for a new one")]
    Expired(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

fn user_key(platform: &str, app_id: &str, user_id: &str) -> String {
    subject::token(&format!("{platform}:{app_id}:{user_id}"))
}

impl PairingStore {
    /// Opens (or creates) both buckets.
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        Ok(PairingStore {
            codes: bus
                .kv(hg_bus::kv_config(PAIRING_BUCKET, "pending pairing codes"))
                .await?,
            access: bus
                .kv(hg_bus::kv_config(
                    ACCESS_BUCKET,
                    "users approved by pairing",
                ))
                .await?,
        })
    }

    /// Whether the user was approved.
    pub async fn is_paired(
        &self,
        platform: &str,
        app_id: &str,
        user_id: &str,
    ) -> Result<bool, BusError> {
        let key = user_key(platform, app_id, user_id);
        Ok(self.access.get(key).await.map_err(kv_error)?.is_some())
    }

    /// Every pending, unexpired code (optionally of one app).
    pub async fn pending(&self, now_ms: i64) -> Result<Vec<PairingRequest>, BusError> {
        let mut keys = self.codes.keys().await.map_err(kv_error)?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            if let Ok(Some(bytes)) = self.codes.get(&key).await
                && let Ok(request) = serde_json::from_slice::<PairingRequest>(&bytes)
            {
                if request.expires_ms > now_ms {
                    out.push(request);
                } else {
                    let _ = self.codes.delete(&key).await;
                }
            }
        }
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    /// The pairing status of a sender, issuing a code when they have none.
    pub async fn status(
        &self,
        request: PairingRequest,
        config: &PairingConfig,
        now_ms: i64,
    ) -> Result<PairingStatus, BusError> {
        if self
            .is_paired(&request.platform, &request.app_id, &request.user_id)
            .await?
        {
            return Ok(PairingStatus::Approved);
        }
        let pending = self.pending(now_ms).await?;
        if let Some(existing) = pending.iter().find(|r| {
            r.platform == request.platform
                && r.app_id == request.app_id
                && r.user_id == request.user_id
        }) {
            return Ok(PairingStatus::Pending(existing.clone()));
        }
        let of_app = pending
            .iter()
            .filter(|r| r.platform == request.platform && r.app_id == request.app_id)
            .count();
        if of_app >= config.max_pending_per_app {
            return Ok(PairingStatus::Full);
        }
        let mut request = request;
        request.created_ms = now_ms;
        request.expires_ms = now_ms + config.code_ttl.as_millis() as i64;
        loop {
            request.code = new_code();
            let bytes = serde_json::to_vec(&request).expect("pairing request serializes");
            match self.codes.create(&request.code, bytes.into()).await {
                Ok(_) => return Ok(PairingStatus::Pending(request)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(kv_error(e)),
            }
        }
    }

    /// Approves `code`: its user may talk to the agent from now on.
    pub async fn approve(&self, code: &str, now_ms: i64) -> Result<PairingRequest, ApproveError> {
        let code = code.trim().to_uppercase();
        let bytes = self
            .codes
            .get(&code)
            .await
            .map_err(kv_error)?
            .ok_or_else(|| ApproveError::Unknown(code.clone()))?;
        let request: PairingRequest =
            serde_json::from_slice(&bytes).map_err(|_| ApproveError::Unknown(code.clone()))?;
        if request.expires_ms <= now_ms {
            let _ = self.codes.delete(&code).await;
            return Err(ApproveError::Expired(code));
        }
        let paired = Paired {
            platform: request.platform.clone(),
            app_id: request.app_id.clone(),
            user_id: request.user_id.clone(),
            username: request.username.clone(),
            code: code.clone(),
            approved_ms: now_ms,
        };
        self.access
            .put(
                user_key(&request.platform, &request.app_id, &request.user_id),
                serde_json::to_vec(&paired)
                    .expect("paired user serializes")
                    .into(),
            )
            .await
            .map_err(kv_error)?;
        self.codes.delete(&code).await.map_err(kv_error)?;
        Ok(request)
    }
}

fn new_code() -> String {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..CODE_LEN]
        .iter()
        .map(|b| CODE_ALPHABET[*b as usize % CODE_ALPHABET.len()] as char)
        .collect()
}

fn kv_error(e: impl std::fmt::Display) -> BusError {
    BusError::Kv {
        bucket: PAIRING_BUCKET.to_owned(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_eight_unambiguous_characters() {
        for _ in 0..100 {
            let code = new_code();
            assert_eq!(code.len(), CODE_LEN);
            assert!(code.bytes().all(|b| CODE_ALPHABET.contains(&b)), "{code}");
        }
        assert_ne!(new_code(), new_code());
    }
}
