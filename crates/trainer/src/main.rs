//! `trainer`: train or evaluate a contrastive model from a YAML config.
//!
//! ```text
//! trainer --config configs/simclr.yaml [--set train.steps=100 ...]
//! trainer eval --config configs/simclr.yaml --checkpoint runs/simclr
//! mpirun -n 8 trainer --config configs/clip.yaml
//! ```
//! Errors print their whole cause chain and exit with status 2.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "trainer",
    version,
    about = "Exact global-batch contrastive training",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML config to train with.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override a config key, e.g. `--set train.steps=100` (repeatable; value parsed as YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Evaluate a checkpoint: kNN top-1 (and zero-shot top-1 for CLIP), printed as JSON.
    Eval {
        /// The config the checkpoint was trained with.
        #[arg(long, short)]
        config: PathBuf,
        /// A `step-<N>` directory, or a run directory (its `latest` is used).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Eval { config, checkpoint, overrides }) => {
            trainer::eval_command(&config, &overrides, &checkpoint)
        }
        None => match cli.config {
            Some(config) => trainer::train_command(&config, &cli.overrides).map(|_| ()),
            None => Err(anyhow::anyhow!("nothing to do: pass --config FILE to train, or `trainer eval --help`")),
        },
    };
    if let Err(e) = result {
        let rank = std::env::var("OMPI_COMM_WORLD_RANK").or_else(|_| std::env::var("PMI_RANK")).unwrap_or_default();
        let who = if rank.is_empty() { String::new() } else { format!(" [rank {rank}]") };
        eprintln!("error{who}: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(2);
    }
}
