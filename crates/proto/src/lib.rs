//! The HarnessGate bus contract: generated protobuf types (`harnessgate.v1`)
//! and the subject names every service agrees on.

pub mod subject;

/// Generated from `proto/harnessgate/v1/bus.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/harnessgate.v1.rs"));
}

pub use prost::Message;
pub use v1::*;

/// A protobuf message that travels on the bus, with the type name carried in
/// the `Hg-Type` header so subscribers can decode without guessing.
pub trait BusMessage: prost::Message + Default {
    /// Fully qualified protobuf name, e.g. `harnessgate.v1.InboundMessage`.
    const TYPE_NAME: &'static str;
}

macro_rules! bus_message {
    ($($ty:ident),* $(,)?) => {
        $(impl BusMessage for v1::$ty {
            const TYPE_NAME: &'static str = concat!("harnessgate.v1.", stringify!($ty));
        })*
    };
}

bus_message!(
    InboundMessage,
    OutboundMessage,
    DeliveryReceipt,
    AgentEvent,
    ResolveRequest,
    ResolveResponse,
    DeadLetter,
);

/// Current Unix time in milliseconds, as the `timestamp_ms` fields carry it.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
