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

/// jemalloc serves the whole process: its malloc symbols are unprefixed, so
/// libtorch's `posix_memalign` comes here too; its options are
/// [`trainer::alloc::MALLOC_CONF`].
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Shown after the options of `trainer --help` (and of `trainer` alone).
const EXAMPLES: &str = "\
Examples:
  launch/mpirun.sh -n 2 trainer --config configs/simclr.yaml      train on 2 ranks of this machine
  trainer --config configs/simclr.yaml --set train.steps=100      one rank, one key overridden
  mpirun -n 8 trainer --config configs/clip.yaml                   a cluster's mpirun
  sbatch launch/slurm.sbatch configs/mocov2.yaml                   Slurm, requeued before its time limit
  trainer eval --checkpoint runs/simclr                            evaluate a run's latest checkpoint
  trainer config --config configs/simclr.yaml --print              every key with its value in force
  trainer compare runs/simclr runs/simclr-lr4e-3                  a sweep's differing keys and figures

Logs: CONTRAST_LOG (or RUST_LOG; CONTRAST_LOG wins) takes a tracing filter, e.g. `debug`.
Every key and its default: docs/config.md.";

#[derive(Parser, Debug)]
#[command(
    name = "trainer",
    version,
    about = "Exact global-batch contrastive training",
    after_help = EXAMPLES,
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
    /// Log lines as `plain` text or one `json` object per line.
    #[arg(long, value_enum, default_value = "plain", global = true)]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Evaluate a checkpoint: kNN top-1 (and zero-shot top-1 for CLIP), printed as JSON.
    ///
    /// It prints one JSON object on stdout: `checkpoint` (the step directory
    /// read), `step`, `knn_top1`, `knn_top5`, `linear_top1` (the linear
    /// probe), `zero_shot_top1`, `zero_shot_top5` (image–text methods),
    /// `retrieval` (`i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, `t2i_r5`,
    /// `t2i_r10`; image–text methods), `alignment` and `uniformity`; a figure
    /// that does not apply is null. Accuracies are fractions in [0, 1].
    Eval {
        /// The config the checkpoint was trained with (default: the run directory's config.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A `step-<N>` directory, or a run directory (its `latest` is used).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Embed every image of a split with a checkpoint's backbone (or, with
    /// --texts, the lines of a file with its text tower): embeddings, labels
    /// and a sidecar of source names (or texts).
    Embed {
        /// The config (default: the run directory's config.yaml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A `step-<N>` directory, a run directory (its `latest`), or `best/`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// `train` (data.root) or `test` (t10k or eval.root).
        #[arg(long, default_value = "train", value_parser = ["train", "test"])]
        split: String,
        /// Embed the texts of this UTF-8 file (one per line) with the text
        /// tower instead of a split's images (clip, simcse, quick_thought).
        #[arg(long, value_name = "FILE", conflicts_with = "split")]
        texts: Option<PathBuf>,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Export a checkpoint's model weights alone (no optimiser state, momentum
    /// encoder or queue) as one safetensors file.
    Export {
        /// A `step-<N>` directory, a run directory (its `latest`), or `best/`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// Store floating-point tensors in bfloat16.
        #[arg(long)]
        bf16: bool,
    },
    /// Resolve a config without running: check it and print the plan, or with
    /// --print the resolved YAML (every default filled in).
    Config {
        /// The config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Override a config key (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Print the resolved configuration as YAML.
        #[arg(long)]
        print: bool,
    },
    /// Compare runs: a Markdown table of the config keys that differ between
    /// them (defaults included) and their summaries' figures (`steps`,
    /// `final_loss`, `knn_top1`, `linear_top1`, `zero_shot_top1`,
    /// `samples_per_s`), one row per run.
    Compare {
        /// Run directories (each with its config.yaml; summary.json once finished).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
}

fn main() {
    // Read before MPI is up (its initialisation may rewrite these variables).
    let rank = contrast_comm::launcher_rank(|v| std::env::var(v).ok());
    let cli = Cli::parse();
    let json = matches!(cli.log_format, LogFormat::Json);
    trainer::init_logging(if json { trainer::LogFormat::Json } else { trainer::LogFormat::Plain });
    let result = match cli.command {
        Some(Command::Eval { config, checkpoint, overrides }) => trainer::config_path(config.as_deref(), &checkpoint)
            .and_then(|config| trainer::eval_command(&config, &overrides, &checkpoint)),
        Some(Command::Config { config, overrides, print }) => trainer::config_command(&config, &overrides, print),
        Some(Command::Compare { runs }) => trainer::compare::compare_command(&runs),
        Some(Command::Export { checkpoint, out, bf16 }) => trainer::export_command(&checkpoint, &out, bf16),
        Some(Command::Embed { config, checkpoint, out, split, texts, overrides }) => {
            let input = match texts {
                Some(file) => trainer::EmbedInput::Texts(file),
                None => trainer::EmbedInput::Split { test: split == "test" },
            };
            trainer::config_path(config.as_deref(), &checkpoint)
                .and_then(|config| trainer::embed_command(&config, &overrides, &checkpoint, &out, &input))
        }
        None => match cli.config {
            Some(config) => trainer::train_command(&config, &cli.overrides).map(|_| ()),
            // `trainer` alone: what it does and how, on stdout.
            None => {
                use clap::CommandFactory;
                Cli::command().print_help().map_err(anyhow::Error::from)
            }
        },
    };
    if let Err(e) = result {
        // The launcher names the rank even when the error came before MPI was up
        // (Open MPI, PMI, PMIx and Slurm variables alike).
        if json {
            let line = serde_json::json!({"level": "ERROR", "rank": rank, "error": format!("{e:#}")});
            eprintln!("{line}");
        } else {
            let who = rank.map(|r| format!(" [rank {r}]")).unwrap_or_default();
            eprintln!("error{who}: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
        }
        std::process::exit(2);
    }
}
