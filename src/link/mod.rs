//! The link between the proxy (local half) and the agent (remote half): one
//! HTTP/2 connection, over mutual TLS or over the stdio of `ssh`.
//!
//! Both halves use this module; it knows the wire contract and how to carry
//! byte streams on HTTP/2 bodies, and nothing about either half's internals.

pub mod datagram;
pub mod protocol;
pub mod stream;
pub mod transport;
