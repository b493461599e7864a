//! Roles: each wires shared modules together; no protocol logic lives here.

pub mod manager;
pub mod standalone;
