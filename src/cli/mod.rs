//! The `agentca` command line: flags become checked values here, then each command runs.

/// Prints a line to standard output (see `write_stdout`).
macro_rules! outln {
    ($($arg:tt)*) => { $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Prints to standard output (see `write_stdout`).
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::write_stdout(format_args!($($arg)*)) };
}

/// Prints a line to standard error; a closed standard error is ignored, never a panic.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

mod admin;
mod audit;
mod eval;
mod generate;
mod loadgen;
mod serve;
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
    /// Run the gRPC decision service (exit 0 on clean shutdown, 3 if the bundle is invalid).
    Serve(serve::ServeArgs),
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
        /// Also append the decision to this audit log (hash-chained, fsynced).
        #[arg(long, value_name = "PATH|-")]
        audit: Option<String>,
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
        /// Also append each decision to this audit log (hash-chained, fsynced).
        #[arg(long, value_name = "PATH|-")]
        audit: Option<String>,
    },
    /// Send a live signal, or ask for status or a reload, to a running server.
    Admin(admin::AdminArgs),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Write a large synthetic bundle (N agents, P policies), deterministic from a seed.
    Generate(generate::GenerateArgs),
    /// Drive Evaluate on a running server and print throughput and latency.
    Loadgen(loadgen::LoadArgs),
    /// A no-op DecisionService (same proto and stack, constant answer): the load baseline.
    #[command(hide = true)]
    NoopServe(loadgen::NoopArgs),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain (exit 0 intact, 1 broken, saying where).
    Verify {
        /// Audit files; rotated files may be given in any order.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Accept a chain that starts after its first record (older files removed on purpose).
        #[arg(long)]
        partial: bool,
    },
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    // Every command runs where Cedar's evaluator has the room that `serve` gives its request
    // threads, so that a deep policy decides offline exactly as it does when served.
    let command =
        std::thread::Builder::new().name("agentca".into()).stack_size(STACK).spawn(move || dispatch(cli.command));
    match command.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => ExitCode::from(code),
        Ok(Err(_)) => ExitCode::from(exit::FAILURE),
        Err(e) => {
            errln!("agentca: cannot start: {e}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// The stack of each thread that decides (the command's, and `serve`'s request threads).
pub(crate) const STACK: usize = 32 << 20;

fn dispatch(command: Command) -> u8 {
    match command {
        Command::Serve(args) => serve::run(args),
        Command::Validate { bundle } => validate::run(&bundle.policies),
        Command::Eval { bundle, request, explain, audit } => {
            eval::run(&bundle.policies, &request, explain, audit.as_deref())
        }
        Command::Test { bundle, files, verbose, audit } => {
            test::run(&bundle.policies, &files, verbose, audit.as_deref())
        }
        Command::Admin(args) => admin::run(args),
        Command::Audit(AuditCommand::Verify { paths, partial }) => audit::verify_files(&paths, partial),
        Command::Generate(args) => generate::run(args),
        Command::Loadgen(args) => loadgen::run_load(args),
        Command::NoopServe(args) => loadgen::run_noop(args),
    }
}

/// How a command ends when its standard output is closed (`agentca eval … | head -c1`):
/// quietly, with the status of a process that SIGPIPE ended (128 + 13), so that no script
/// mistakes a cut-off answer for success (an `eval` exit 0 means allow).
pub const EXIT_CLOSED_STDOUT: i32 = 141;

/// Writes to standard output. A reader that went away ends the command quietly (status
/// 141); any other write error (a full disk) ends it with a message and status 1.
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(EXIT_CLOSED_STDOUT);
        }
        errln!("agentca: cannot write to standard output: {e}");
        std::process::exit(i32::from(exit::FAILURE));
    }
}

/// An audit log for the offline commands: every record fsynced before the command goes on.
fn offline_audit(target: Option<&str>) -> Result<Option<crate::audit::Audit>, u8> {
    let Some(target) = target else { return Ok(None) };
    let config = crate::audit::Config::new(crate::audit::Target::parse(target));
    crate::audit::Audit::start(config).map(Some).map_err(|e| {
        errln!("agentca: {e}");
        exit::FAILURE
    })
}

/// Writes one offline decision's record; an error is reported and fails the command.
fn audit_decision(
    audit: Option<&crate::audit::Audit>,
    snap: &Snapshot,
    request: &crate::request::Request,
    decision: &crate::engine::Decision,
) -> Result<(), u8> {
    let Some(audit) = audit else { return Ok(()) };
    let caller = crate::records::Caller { peer: None, identity: std::env::var("USER").ok(), via: "cli" };
    let record = crate::records::DecisionRecord::new(snap, request, decision, &caller);
    audit.submit_blocking(crate::records::body(&record)).map_err(|e| {
        errln!("agentca: audit: {e}");
        exit::FAILURE
    })
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
        errln!("error: {e}");
    }
    let n = errors.0.len();
    errln!("agentca: bundle `{}` is invalid: {n} error{}", dir.display(), if n == 1 { "" } else { "s" });
}
