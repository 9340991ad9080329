//! The `agentca` command line: flags become checked values here, then each command runs.

/// Prints a line to standard output; give it a `?` (see [`write_stdout`]).
macro_rules! outln {
    ($($arg:tt)*) => { $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Prints to standard output; give it a `?` (see [`write_stdout`]).
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
#[cfg(feature = "tools")]
mod generate;
#[cfg(feature = "tools")]
mod loadgen;
mod serve;
mod test;
mod validate;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::audit::{AuditError, Refused};
use crate::bundle::BundleErrors;
use crate::grpc::client::ClientError;
use crate::signals::JournalError;
use crate::snapshot::Snapshot;

/// Exit codes of DESIGN §8.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const DENY: u8 = 2;
    pub const INVALID_BUNDLE: u8 = 3;
    /// A fleet's change is in the stream and applied here, but some replicas had not
    /// confirmed it within --fleet-ack-timeout (they are named).
    pub const UNCONFIRMED: u8 = 4;
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

/// How a client command reaches a secured server: TLS files and a bearer token in a file.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// The CA that issued the server's certificate (PEM): connect with TLS (a bare address
    /// becomes https://).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) to present, for a server that requires mutual TLS.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Send `authorization: Bearer <token>` with the token read from this file (one line).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl ClientArgs {
    /// The connection settings, with `token` unless a token file is given.
    fn connect(&self, token: Option<&str>) -> Result<crate::grpc::client::Connect, Error> {
        let token = match &self.token_file {
            Some(path) => Some(crate::grpc::client::read_token_file(path)?),
            None => token.map(str::to_string),
        };
        Ok(crate::grpc::client::Connect {
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            token,
        })
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC decision service (exit 0 on clean shutdown, 3 if the bundle is invalid).
    Serve(Box<serve::ServeArgs>),
    /// Parse and validate the bundle (exit 0 valid, 3 invalid).
    Validate {
        #[command(flatten)]
        bundle: BundleArgs,
        /// Also lay the live directory changes of this state folder (`serve --state`) over the
        /// bundle's directory, as `serve` would at start: a bundle they no longer apply over
        /// is invalid.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
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
    #[cfg(feature = "tools")]
    Generate(generate::GenerateArgs),
    /// Drive Evaluate on a running server and print throughput and latency.
    #[cfg(feature = "tools")]
    Loadgen(loadgen::LoadArgs),
    /// A no-op DecisionService (same proto and stack, constant answer): the load baseline.
    #[cfg(feature = "tools")]
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

/// Why a command failed. Commands return it; [`run`] prints it and picks the exit code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("cannot start: {0}")]
    Thread(io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    /// A reader that went away (`BrokenPipe`) ends the command quietly, see [`EXIT_CLOSED_STDOUT`].
    #[error("cannot write to standard output: {0}")]
    Stdout(io::Error),
    /// Printed after each of the bundle's errors, one a line.
    #[error("bundle `{}` is invalid: {} error{}", dir.display(), errors.0.len(), if errors.0.len() == 1 { "" } else { "s" })]
    InvalidBundle { dir: PathBuf, errors: BundleErrors },
    #[error("invalid request: {0}")]
    Request(#[from] eval::RequestInputError),
    #[error("cannot print the decision: {0}")]
    Print(serde_json::Error),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("audit: {0}")]
    AuditRecord(#[from] Refused),
    #[error(transparent)]
    AdminAccess(#[from] serve::AdminAccess),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Access(#[from] crate::access::AccessError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    DirectoryJournal(#[from] crate::live::LiveJournalError),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    #[error("another `agentca serve` uses the state folder `{}` (--state): give each server its own", .0.display())]
    StateInUse(PathBuf),
    #[error("state folder: `{}`: {source}", path.display())]
    State { path: PathBuf, source: io::Error },
    #[error("cannot write `{}`: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr} (--{flag}): {source}")]
    Listen { flag: &'static str, addr: SocketAddr, source: io::Error },
    #[error("--metrics-listen {0} is the gRPC address (--listen): give the metrics listener a port of its own")]
    MetricsOnGrpcPort(SocketAddr),
    #[error(transparent)]
    Serve(#[from] crate::grpc::ServeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[cfg(feature = "tools")]
    #[error("cannot write the bundle to `{}`: {source}", dir.display())]
    Generate { dir: PathBuf, source: io::Error },
    #[cfg(feature = "tools")]
    #[error("cannot read `{}`: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[cfg(feature = "tools")]
    #[error("`{}` is not JSON: {source}", path.display())]
    NotJson { path: PathBuf, source: serde_json::Error },
    #[cfg(feature = "tools")]
    #[error("invalid request `{}`: {source}", path.display())]
    LoadRequest { path: PathBuf, source: crate::request::RequestError },
    #[cfg(feature = "tools")]
    #[error(transparent)]
    Noop(#[from] crate::grpc::load::NoopError),
}

impl Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::InvalidBundle { .. } => exit::INVALID_BUNDLE,
            _ => exit::FAILURE,
        }
    }
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The NATS client says every reconnect attempt at info level: the fleet's own lines say
        // what matters (out of step, in step again).
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{default_level},async_nats=warn")));
    match &cli.command {
        Command::Serve(args) if args.log_format() == serve::LogFormat::Json => {
            // One JSON object a line, the event's fields beside `message` (no ANSI colours),
            // and the call's span (`call`: method, peer, identity) under `span`.
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
        }
        _ => {
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init();
        }
    }
    // Every command runs where Cedar's evaluator has the room that `serve` gives its request
    // threads, so that a deep policy decides offline exactly as it does when served.
    let command = std::thread::Builder::new()
        .name("agentca".into())
        .stack_size(STACK)
        .spawn(move || dispatch(cli.command).unwrap_or_else(|e| report(&e)));
    match command.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => code,
        // The command panicked: the panic hook has said why.
        Ok(Err(_)) => ExitCode::from(exit::FAILURE),
        Err(e) => report(&Error::Thread(e)),
    }
}

/// The stack of each thread that decides (the command's, and `serve`'s request threads).
pub(crate) const STACK: usize = 32 << 20;

fn dispatch(command: Command) -> Result<ExitCode, Error> {
    match command {
        Command::Serve(args) => serve::run(*args),
        Command::Validate { bundle, state } => validate::run(&bundle.policies, state.as_deref()),
        Command::Eval { bundle, request, explain, audit } => {
            eval::run(&bundle.policies, &request, explain, audit.as_deref())
        }
        Command::Test { bundle, files, verbose, audit } => {
            test::run(&bundle.policies, &files, verbose, audit.as_deref())
        }
        Command::Admin(args) => admin::run(args),
        Command::Audit(AuditCommand::Verify { paths, partial }) => audit::verify_files(&paths, partial),
        #[cfg(feature = "tools")]
        Command::Generate(args) => generate::run(args),
        #[cfg(feature = "tools")]
        Command::Loadgen(args) => loadgen::run_load(args),
        #[cfg(feature = "tools")]
        Command::NoopServe(args) => loadgen::run_noop(args),
    }
}

/// The one place a failed command is reported: prints the error and picks the exit code.
fn report(error: &Error) -> ExitCode {
    if let Error::Stdout(e) = error
        && e.kind() == io::ErrorKind::BrokenPipe
    {
        return ExitCode::from(EXIT_CLOSED_STDOUT);
    }
    print_error(error);
    ExitCode::from(error.exit_code())
}

/// Prints an error to standard error (a bundle's own errors first, one a line). Besides
/// [`report`], only `test` calls it, for an error that fails one case and not the run.
fn print_error(error: &Error) {
    if let Error::InvalidBundle { errors, .. } = error {
        for e in &errors.0 {
            errln!("error: {e}");
        }
    }
    errln!("agentca: {error}");
}

/// How a command ends when its standard output is closed (`agentca eval … | head -c1`):
/// quietly, with the status of a process that SIGPIPE ended (128 + 13), so that no script
/// mistakes a cut-off answer for success (an `eval` exit 0 means allow).
pub const EXIT_CLOSED_STDOUT: u8 = 141;

/// Writes to standard output. The error ends the command: quietly with status 141 if the
/// reader went away, with a message and status 1 for any other (a full disk).
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) -> Result<(), Error> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|()| out.flush()).map_err(Error::Stdout)
}

/// How many threads a command's runtime has.
enum Threads {
    /// A client's few calls.
    One,
    /// A server, or a load generator.
    Many,
}

/// Runs `future` to completion on a new tokio runtime: the one place a command builds one.
fn block_on<F: Future>(threads: Threads, future: F) -> Result<F::Output, Error> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::Many => {
            // Cedar's evaluator guards its own recursion by the stack left: a larger stack
            // than tokio's 2 MiB lets every policy the bundle's nesting limit accepts evaluate
            // (the memory is reserved, not used, until a deep policy needs it).
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.thread_stack_size(STACK);
            builder
        }
    };
    let runtime = builder.enable_all().build().map_err(Error::Runtime)?;
    let output = runtime.block_on(future);
    // Calls cut at the end of `serve`'s grace period may still be parked on the runtime: drop
    // them rather than wait for them.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(output)
}

/// An audit log for the offline commands: every record fsynced before the command goes on.
fn offline_audit(target: Option<&str>) -> Result<Option<crate::audit::Audit>, Error> {
    let Some(target) = target else { return Ok(None) };
    let mut config = crate::audit::Config::new(crate::audit::Target::parse(target));
    // A one-shot command does not wait for a failing disk (or a closed stdout) to recover:
    // a record that cannot be written fails the command.
    config.on_full = crate::audit::OnFull::Deny;
    Ok(Some(crate::audit::Audit::start(config)?))
}

/// Writes one offline decision's record.
fn audit_decision(
    audit: Option<&crate::audit::Audit>,
    snap: &Snapshot,
    request: &crate::request::Request,
    decision: &crate::engine::Decision,
) -> Result<(), Error> {
    let Some(audit) = audit else { return Ok(()) };
    let caller = crate::records::Caller {
        identity: std::env::var("USER").ok().map(Into::into),
        via: "cli",
        ..Default::default()
    };
    let record = crate::records::DecisionRecord::new(snap, request, decision, &caller);
    Ok(audit.submit_blocking(crate::records::body(&record))?)
}

/// Loads the bundle.
fn load(dir: &Path) -> Result<Snapshot, Error> {
    Snapshot::load(dir).map_err(|errors| Error::InvalidBundle { dir: dir.to_path_buf(), errors })
}
