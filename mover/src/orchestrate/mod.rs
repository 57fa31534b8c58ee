//! Orchestration: the hook profiles that say how to act on a cluster's sites and hosts.
//!
//! Everything here is pure: no network, no agents, no clock. Agents render and run hook
//! commands from their own copy of the profile, so nothing received over the network is
//! ever a command line.

pub mod hooks;

pub use hooks::{HookAction, HookCommand, HookContext, HookError, HookProfile};
