//! Helpers shared by the integration tests (each test crate uses only part of them).
#![allow(dead_code)]

pub mod agent;
pub mod borg_repo;
pub mod dnsq;
pub mod docker;
pub mod images;
pub mod mesh;
pub mod metrics;
pub mod netstat;
pub mod plane;
pub mod podman;
pub mod registry;
pub mod runtime;
pub mod sandbox;
pub mod wholenode;
