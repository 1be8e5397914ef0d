//! Files between Telegram and the NATS object store bucket `hg_files`.

use std::time::Duration;

use async_nats::jetstream::object_store::{self, ObjectStore};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use hg_bus::{Bus, BusError};
use teloxide_core::net::Download;
use teloxide_core::prelude::Requester;
use teloxide_core::types::FileId;
use tokio::io::AsyncReadExt;

use crate::api::BotClient;

/// Object store bucket shared by every component for message files.
pub const FILES_BUCKET: &str = "hg_files";

/// How long stored files are kept when this component creates the bucket.
const FILES_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Opens the files bucket, creating it when missing.
pub(crate) async fn open(bus: &Bus) -> Result<ObjectStore, BusError> {
    let js = bus.jetstream();
    if let Ok(store) = js.get_object_store(FILES_BUCKET).await {
        return Ok(store);
    }
    let created = js
        .create_object_store(object_store::Config {
            bucket: FILES_BUCKET.to_owned(),
            description: Some("message attachments".to_owned()),
            max_age: FILES_MAX_AGE,
            num_replicas: bus.config().replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Another replica may have created it meanwhile.
        Err(e) => js
            .get_object_store(FILES_BUCKET)
            .await
            .map_err(|_| BusError::Topology {
                what: format!("object store {FILES_BUCKET}"),
                reason: e.to_string(),
            }),
    }
}

/// Why a file could not be fetched from Telegram.
#[derive(Debug)]
pub(crate) enum FetchError {
    /// Larger than allowed (known up front or found while downloading).
    TooLarge,
    /// Telegram refused it (for example "file is too big"): do not retry.
    Refused(String),
    /// Network or server trouble: try the update again later.
    Transient(String),
}

/// Downloads a file through `getFile` and the file endpoint, giving up as
/// soon as it exceeds `max_bytes`.
pub(crate) async fn download(
    client: &BotClient,
    file_id: &str,
    max_bytes: u64,
) -> Result<Bytes, FetchError> {
    let file = match client.bot.get_file(FileId(file_id.to_owned())).await {
        Ok(file) => file,
        Err(e) => {
            let reason = client.describe(&e);
            return Err(match e {
                teloxide_core::RequestError::Api(teloxide_core::ApiError::Unknown(d))
                    if d.contains("file is too big") =>
                {
                    FetchError::TooLarge
                }
                teloxide_core::RequestError::Api(_) => FetchError::Refused(reason),
                _ => FetchError::Transient(reason),
            });
        }
    };
    if u64::from(file.meta.size) > max_bytes {
        return Err(FetchError::TooLarge);
    }
    let mut stream = client.bot.download_file_stream(&file.path);
    let mut data = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| FetchError::Transient(client.describe(&e)))?;
        if (data.len() + chunk.len()) as u64 > max_bytes {
            return Err(FetchError::TooLarge);
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

/// Stores `data` under `key`.
pub(crate) async fn put(store: &ObjectStore, key: &str, data: &[u8]) -> Result<(), BusError> {
    let mut reader = data;
    store
        .put(key, &mut reader)
        .await
        .map(|_| ())
        .map_err(|e| BusError::Publish {
            subject: format!("{FILES_BUCKET}/{key}"),
            reason: e.to_string(),
        })
}

/// Reads the object `key`.
pub(crate) async fn get(store: &ObjectStore, key: &str) -> Result<Bytes, String> {
    let mut object = store.get(key).await.map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    object
        .read_to_end(&mut data)
        .await
        .map_err(|e| e.to_string())?;
    Ok(data.into())
}
