//! The API layer: what users hold and call. [`manager::WorldManager`] (one per process: the
//! registry of worlds and their events), [`world::World`] (one communicator), requests,
//! options, the rendezvous id, element types and reductions, and the one `Error` type.
//! `lib.rs` re-exports the public items; nothing here does I/O itself.

#[cfg(feature = "etcd")]
pub(crate) mod directory;
pub(crate) mod elastic;
pub(crate) mod error;
pub(crate) mod id;
pub(crate) mod manager;
pub(crate) mod options;
pub(crate) mod request;
pub(crate) mod scope;
pub(crate) mod types;
pub(crate) mod world;
