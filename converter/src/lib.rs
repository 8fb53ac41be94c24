//! The edge bundle format and the inference runtime shared by `edge-agent` (daemon, pool,
//! one-shot classify) and `edge-convert`, plus (feature `convert`) the converter itself.

pub mod bundle;
pub mod preprocess;
pub mod runtime;

#[cfg(feature = "convert")]
pub mod tf;
#[cfg(feature = "convert")]
pub mod convert;
