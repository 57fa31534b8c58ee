//! Orchestration: the inventory of a cluster, the hook profiles that say how to act on its
//! sites and hosts, and the planner that turns an operation into a runbook.
//!
//! Everything here is pure: no network, no agents, no clock. An executor (to come) runs a
//! [`Runbook`] step by step; agents render and run hook commands from their own copy of the
//! profile, so nothing received over the network is ever a command line.

pub mod cluster;
pub mod exec;
pub mod hooks;
pub mod inventory;
pub mod journal;
pub mod plan;
pub mod runbook;

pub use hooks::{HookAction, HookCommand, HookContext, HookError, HookProfile};
pub use inventory::{Inventory, InventoryError, Method, Role};
pub use plan::{plan, rollback, Operation, PlanError};
pub use runbook::{Runbook, Step, StepAction, StepId, Target, Transfer};
