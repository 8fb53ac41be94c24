//! The read-only web pages: the device page the daemon serves on `http.listen` (`/`,
//! `/api/status`) and the fleet dashboard of `edge-agent fleet-status --serve` (`/`,
//! `/api/fleet`). Server-rendered HTML and SVG, no JavaScript framework, no external assets;
//! every string that came from the network is escaped (`html::esc`).

pub mod device;
pub mod fleet;
pub mod history;
pub mod html;
pub mod thumb;

pub use fleet::Fleet;
pub use history::History;
