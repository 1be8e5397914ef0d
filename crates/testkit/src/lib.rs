//! Test kit: a real `nats-server` per test, and fake servers that speak the
//! wire protocols of the platforms and runtimes we cannot reach from tests.

pub mod fake_claude;
pub mod fake_telegram;
pub mod nats;
