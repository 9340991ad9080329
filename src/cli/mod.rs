//! The `agentca` command line: flags become checked values here, then each command runs.

mod eval;
mod test;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::bundle::BundleErrors;
use crate::snapshot::Snapshot;

/// Exit codes of DESIGN §8.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const DENY: u8 = 2;
    pub const INVALID_BUNDLE: u8 = 3;
}

#[derive(Debug, Parser)]
#[command(name = "agentca", version, about = "Conditional Access for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct BundleArgs {
    /// The policy bundle folder.
    #[arg(long, value_name = "DIR", default_value = "policies", env = "AGENTCA_POLICIES")]
    policies: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse and validate the bundle (exit 0 valid, 3 invalid).
    Validate {
        #[command(flatten)]
        bundle: BundleArgs,
    },
    /// Decide one request offline and print the decision (exit 0 allow, 2 deny, 1 bad input).
    Eval {
        #[command(flatten)]
        bundle: BundleArgs,
        /// The request as JSON, from a file or `-` for standard input.
        #[arg(long, value_name = "FILE|-")]
        request: String,
        /// Add, per policy, whether it applied or the first part that did not match.
        #[arg(long)]
        explain: bool,
    },
    /// Run test cases (default: the bundle's tests/*.json); exit 0 if all pass.
    Test {
        #[command(flatten)]
        bundle: BundleArgs,
        /// Test case files.
        files: Vec<PathBuf>,
        /// Print every case, not only failures.
        #[arg(long, short)]
        verbose: bool,
    },
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Validate { bundle } => validate::run(&bundle.policies),
        Command::Eval { bundle, request, explain } => eval::run(&bundle.policies, &request, explain),
        Command::Test { bundle, files, verbose } => test::run(&bundle.policies, &files, verbose),
    };
    ExitCode::from(code)
}

/// Loads the bundle, or prints its errors and says so.
fn load(dir: &std::path::Path) -> Result<Snapshot, u8> {
    Snapshot::load(dir).map_err(|errors| {
        print_bundle_errors(dir, &errors);
        exit::INVALID_BUNDLE
    })
}

fn print_bundle_errors(dir: &std::path::Path, errors: &BundleErrors) {
    for e in &errors.0 {
        eprintln!("error: {e}");
    }
    let n = errors.0.len();
    eprintln!("agentca: bundle `{}` is invalid: {n} error{}", dir.display(), if n == 1 { "" } else { "s" });
}
