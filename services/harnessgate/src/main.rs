//! `harnessgate`: one binary, every component.
//!
//! ```text
//! harnessgate up                  everything in one process (+ a local nats-server when none is configured)
//! harnessgate run bridge web      chosen components in this process
//! harnessgate tail 'hg.in.>'      decode and print bus traffic
//! harnessgate pairing approve CODE let a user in (also: pairing list)
//! harnessgate config check        validate and print the effective config, secrets redacted
//! harnessgate apps add telegram --token …   add a bot at runtime (also: apps list, apps remove)
//! ```

// The message path allocates many small short-lived buffers; glibc malloc
// showed up as ~25 % of the stack's CPU under load (docs/benchmarks.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod app;
mod apps;
mod config;
mod pairing;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad configuration (EX_CONFIG is 78; 64 is EX_USAGE, which
/// the operator guides expect for "fix your invocation or config").
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "harnessgate",
    version,
    about = "Connects AI agent runtimes to messaging platforms over NATS"
)]
struct Cli {
    /// Configuration file (TOML). Default: ./harnessgate.toml when present.
    #[arg(long, short, global = true, env = "HG_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every component in one process (Telegram when bots are
    /// configured); starts a local nats-server with JetStream when
    /// `nats.url` is not set.
    Up,
    /// Run the given components in this process.
    Run {
        #[arg(required = true, value_parser = ["bridge", "web", "telegram-ingress", "telegram-egress"])]
        components: Vec<String>,
    },
    /// Print bus messages on a subject (wildcards allowed), decoded.
    Tail {
        subject: String,
        /// Stop after this many messages.
        #[arg(long, short = 'n')]
        count: Option<usize>,
    },
    /// Bots added and removed at runtime (`apps add telegram --token …`).
    Apps {
        #[command(subcommand)]
        command: apps::AppsCommand,
    },
    /// Pairing codes of people waiting to talk to the agent.
    Pairing {
        #[command(subcommand)]
        command: pairing::PairingCommand,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate and print the effective configuration, secrets redacted.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("harnessgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Config {
        command: ConfigCommand::Check,
    } = cli.command
    {
        print!("{}", config.redacted_toml());
        eprintln!("configuration ok");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("harnessgate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Up => app::up(config).await,
            Command::Run { components } => app::run(config, &components).await,
            Command::Tail { subject, count } => tail::tail(&config, &subject, count).await,
            Command::Apps { command } => apps::run(&config, command).await,
            Command::Pairing { command } => pairing::run(&config, command).await,
            Command::Config { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("harnessgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
