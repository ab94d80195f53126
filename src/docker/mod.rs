//! Pure Docker Engine API knowledge shared by both halves: no sockets, no tasks.

pub mod binds;
pub mod error;
pub mod gpu;
pub mod headers;
pub mod ownership;
pub mod ports;
pub mod route;
