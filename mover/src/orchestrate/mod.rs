//! Orchestration: the inventory of a cluster and the hook profiles that say how to act on
//! its sites and hosts.
//!
//! Everything here is pure: no network, no agents, no clock. Agents render and run hook
//! commands from their own copy of the profile, so nothing received over the network is
//! ever a command line.

pub mod hooks;
pub mod inventory;

pub use hooks::{HookAction, HookCommand, HookContext, HookError, HookProfile};
pub use inventory::{Inventory, InventoryError, Method, Role};
