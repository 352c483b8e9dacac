//! The `molt` binary: one executable, one subcommand per job (`model`, `bench`, and later
//! `serve`, `worker`, `migrate`, `train`, `files`, `jobs`, ...). Each subcommand lives in its
//! own module under `cli/` and returns `anyhow::Result`; `main` prints the error chain and
//! exits non-zero.

mod cli;

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: Candle allocates a fresh buffer per tensor op, and
/// glibc serves the large ones with mmap and returns them with munmap, so every op pays page
/// faults and kernel zeroing (a third of a CPU training step's time, by `perf`); mimalloc
/// keeps freed memory and reuses it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v2's `mimalloc.h` (the Rust binding has no constant
/// for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed pages back to the OS (unless `MIMALLOC_PURGE_DELAY` says otherwise):
/// with mimalloc's default 10 ms delay, the buffers of one training step are purged before
/// the next step reallocates them, and the kernel zeroes them again on first touch (a fifth
/// of a Vision Mamba training step, by `perf`; the step ran 20–40 % faster without it). The
/// process keeps its peak heap, which a training or serving process reaches again anyway.
fn keep_freed_pages() {
    // SAFETY: sets one integer option, before any thread that could purge is started.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, -1) }
}

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "molt",
    version,
    about = "Fine-tuning and serving for Mamba state-space models"
)]
struct Cli {
    /// Log filter in tracing's EnvFilter syntax (e.g. `info`, `trainer=debug`). Logs go to
    /// stderr. Default: `info` for `serve` and `worker`, `warn` otherwise.
    #[arg(long, env = "MOLT_LOG", global = true)]
    log: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a model folder: forward pass (logits, loss) and text generation.
    #[command(subcommand)]
    Model(cli::model::ModelCommand),
    /// Fine-tune a base model with a PEFT method on a local JSONL file, printing progress.
    Train(cli::train::TrainArgs),
    /// Train a small Mamba and its BPE tokenizer from random init on a text corpus.
    Pretrain(cli::train::PretrainArgs),
    /// Hybrid PEFT search on local files (MambaPEFT's two steps: which methods, then their
    /// hyperparameters), no server; writes OUT/search.json (and OUT/best with --train-best).
    Search(cli::search::SearchArgs),
    /// Speed benchmark on random-init models (forward, generation, training step, scan);
    /// `molt bench serve`: the serving engine; `molt bench service`: the HTTP service;
    /// `molt bench cuda`: the GPU path.
    Bench(BenchCommand),
    /// Run the service: the HTTP API plus local worker processes (SQLite and local files
    /// under --data-dir unless told otherwise).
    Serve(api::serve::ServeArgs),
    /// Run a queue worker: claim jobs from the database, train, write results to the store.
    Worker(api::worker::WorkerArgs),
    /// Apply the database migrations.
    Migrate(cli::admin::MigrateArgs),
    /// Tenants, API keys and base models (through the admin API).
    Admin(cli::admin::AdminArgs),
    /// Upload, list, show and delete dataset files.
    Files {
        #[command(flatten)]
        client: cli::client::ClientArgs,
        #[command(subcommand)]
        command: cli::client::FilesCommand,
    },
    /// Create, list, show, watch and cancel fine-tuning jobs.
    Jobs {
        #[command(flatten)]
        client: cli::client::ClientArgs,
        #[command(subcommand)]
        command: cli::client::JobsCommand,
    },
    /// Create, list, show, watch and cancel hybrid PEFT searches; their trials, events, and
    /// training the best configuration.
    Searches {
        #[command(flatten)]
        client: cli::client::ClientArgs,
        #[command(subcommand)]
        command: cli::client::SearchesCommand,
    },
    /// Show and download trained adapters.
    Adapters {
        #[command(flatten)]
        client: cli::client::ClientArgs,
        #[command(subcommand)]
        command: cli::client::AdaptersCommand,
    },
    /// Classify image files with a vision model of the server (`POST /v1/classifications`).
    Classify {
        #[command(flatten)]
        client: cli::client::ClientArgs,
        #[command(flatten)]
        args: cli::client::ClassifyArgs,
    },
}

/// `molt bench [FLAGS]` or `molt bench serve [FLAGS]`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchCommand {
    #[command(subcommand)]
    sub: Option<BenchSub>,
    #[command(flatten)]
    args: cli::bench::BenchArgs,
}

#[derive(Subcommand, Debug)]
enum BenchSub {
    /// Serving: tokens/s for base, merged and hot-swapped adapters; cold-adapter latency.
    Serve(cli::bench_serve::BenchServeArgs),
    /// Service speed: upload throughput and memory, job-GET latency under load, queue
    /// claims per second (see BENCHMARKS.md, "Service").
    Service(cli::bench_service::ServiceBenchArgs),
    /// The search sampler's quality: best value after N trials on a synthetic objective,
    /// molt's TPE against random search (bench/search.py adds Optuna).
    Search(cli::bench_search::BenchSearchArgs),
    /// GPU (build with `--features cuda`): fused scan throughput and bandwidth, LoRA
    /// training and generation tokens/s at the mamba-130m shape.
    Cuda(cli::bench_cuda::BenchCudaArgs),
}

/// Runs an async service command on a multi-threaded runtime.
fn block_on<F, E>(fut: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(fut)?;
    Ok(())
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

/// A command whose output is piped into `head` ends quietly when the reader goes away, as
/// Unix tools do, instead of panicking in `println!` on EPIPE. (Rust ignores SIGPIPE by
/// default; the server and workers keep that, so a client that disconnects cannot kill them.)
fn quiet_on_closed_pipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: restores the default disposition before any other thread exists; no handler
    // function is installed.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        tracing::debug!("could not restore SIGPIPE: {e}");
    }
}

fn main() -> ExitCode {
    keep_freed_pages();
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Serve(_) | Command::Worker(_) => "info",
        _ => "warn",
    };
    init_tracing(cli.log.as_deref().unwrap_or(default_log));
    if !matches!(cli.command, Command::Serve(_) | Command::Worker(_)) {
        quiet_on_closed_pipe();
    }
    let result = match cli.command {
        Command::Model(cmd) => cli::model::run(cmd),
        Command::Bench(b) => match b.sub {
            Some(BenchSub::Serve(args)) => cli::bench_serve::run(args),
            Some(BenchSub::Service(args)) => cli::bench_service::run(args),
            Some(BenchSub::Cuda(args)) => cli::bench_cuda::run(args),
            Some(BenchSub::Search(args)) => cli::bench_search::run_bench(args),
            None => cli::bench::run(b.args),
        },
        Command::Train(args) => cli::train::train(args),
        Command::Pretrain(args) => cli::train::pretrain_cmd(args),
        Command::Search(args) => cli::search::search(args),
        Command::Serve(args) => block_on(api::serve::run(args)),
        Command::Worker(args) => block_on(api::worker::run(args)),
        Command::Migrate(args) => cli::admin::migrate(args),
        Command::Admin(args) => cli::admin::run(args),
        Command::Files { client, command } => cli::client::files(&client, command),
        Command::Jobs { client, command } => cli::client::jobs(&client, command),
        Command::Searches { client, command } => cli::client::searches(&client, command),
        Command::Adapters { client, command } => cli::client::adapters(&client, command),
        Command::Classify { client, args } => cli::client::classify(&client, args),
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
