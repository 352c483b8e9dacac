//! The `molt` binary: one executable, one subcommand per job (`model`, `bench`, and later
//! `serve`, `worker`, `migrate`, `train`, `files`, `jobs`, ...). Each subcommand lives in its
//! own module under `cli/` and returns `anyhow::Result`; `main` prints the error chain and
//! exits non-zero.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "molt",
    version,
    about = "Fine-tuning and serving for Mamba state-space models"
)]
struct Cli {
    /// Log filter in tracing's EnvFilter syntax (e.g. `info`, `trainer=debug`). Logs go to
    /// stderr.
    #[arg(long, env = "MOLT_LOG", default_value = "warn", global = true)]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a model folder: forward pass (logits, loss) and text generation.
    #[command(subcommand)]
    Model(cli::model::ModelCommand),
    /// Speed benchmark on random-init models (forward, generation, training step, scan).
    Bench(cli::bench::BenchArgs),
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: ignoring invalid --log filter {filter:?}: {e}");
        tracing_subscriber::EnvFilter::new("warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log);
    let result = match cli.command {
        Command::Model(cmd) => cli::model::run(cmd),
        Command::Bench(args) => cli::bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: "in.safetensors: input_ids: …".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
