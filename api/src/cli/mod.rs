//! The `molt` subcommands, one module each. A new subcommand is a module here plus one
//! variant in `Command` in `main.rs`.

pub mod admin;
pub mod bench;
pub mod bench_cuda;
mod bench_mamba2;
pub mod bench_search;
pub mod bench_serve;
pub mod bench_service;
mod bench_vim;
pub mod client;
pub mod model;
pub mod search;
pub mod train;
