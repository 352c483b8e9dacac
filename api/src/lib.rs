//! molt's service side: the HTTP API (axum), the queue worker, and the `molt serve`
//! launcher. The `molt` binary (`src/main.rs`) wires them to subcommands.
//!
//! Modules by concept: `routes/` (one file per resource), [`auth`] (API keys, admin token),
//! [`error`] (the OpenAI error envelope), [`state`] (`State<AppState>`), [`metrics`]
//! (Prometheus text), [`ratelimit`] (per-key request limits), [`dataset`] (upload validation), [`training`] (hyperparameters and
//! PEFT method checks), [`registry`] (base models), [`worker`] (queue consumer),
//! [`serve`] (API + local worker processes).

pub mod auth;
pub mod builtin;
pub mod dataset;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod ratelimit;
pub mod registry;
pub mod routes;
pub mod search;
pub mod serve;
pub mod serving;
pub mod state;
pub mod training;
pub mod ui;
pub mod worker;

pub use error::ApiError;
pub use state::{ApiConfig, AppState};
