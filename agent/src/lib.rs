//! The edge-agent library: the device daemon's parts, each a module with a pure core and thin
//! I/O around it. The binary (`main.rs`) wires them together.

pub mod broker;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod http;
pub mod metrics;
pub mod model;
pub mod mqtt;
pub mod offload;
pub mod pool;
pub mod queue;
pub mod reconnect;
pub mod reply;
pub mod request;
pub mod routing;
pub mod signal;
pub mod web;
pub mod wire;
