//! Protocol-agnostic media core: the model every protocol converts to and from, and the in-node
//! hub that fans broadcasts out.
//!
//! Guarantees: nothing in this module speaks a protocol; the one list that names output formats
//! is [`MemoSlot`]'s, so that each has its own memo slot and none lies past the end. A frame's
//! payload is a [`bytes::Bytes`] that is shared, never copied, between every consumer of a
//! broadcast. Group boundaries are decided once, in the hub, and marked on its entries
//! ([`Entry::group_start`]).

pub mod feed;
pub(crate) mod frame;
pub mod hub;
pub(crate) mod pace;

pub use frame::{
    AudioInfo, Codec, Frame, Item, MetaValue, Metadata, TrackId, TrackInfo, TrackKind, VideoInfo,
};
pub(crate) use hub::{
    BroadcastConsumer, BroadcastProducer, ConsumerKind, HubConfig, MemoSlot, PublishError,
    valid_name,
};
pub use hub::{Entry, Hub, ReadOutcome};
