//! `agentca loadgen`: drive Evaluate with N requests in flight over M connections for T
//! seconds; `agentca noop-serve`: the no-op baseline server to compare with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::grpc::load::{LoadConfig, LoadReport, run, serve_noop};
use crate::grpc::pb;
use crate::request::RawRequest;

use super::{Error, Threads, block_on, exit};

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The server to load.
    #[arg(long, default_value = "127.0.0.1:50051")]
    target: String,
    /// The request to send (JSON, as for `eval`).
    #[arg(long, value_name = "FILE")]
    request: PathBuf,
    /// Requests in flight.
    #[arg(long, short = 'c', default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections.
    #[arg(long, short = 'm', default_value_t = 4)]
    connections: usize,
    /// Seconds of measured load.
    #[arg(long, short = 't', default_value_t = 10)]
    duration: u64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Also load this server (e.g. `agentca noop-serve`) the same way, first, and compare
    /// (an `http://` URL is loaded in plaintext, whatever the TLS flags).
    #[arg(long, value_name = "ADDR")]
    baseline: Option<String>,
    #[command(flatten)]
    client: super::ClientArgs,
}

pub fn run_load(args: LoadArgs) -> Result<ExitCode, Error> {
    let path = &args.request;
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.clone(), source })?;
    let value = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|source| Error::NotJson { path: path.clone(), source })?;
    let raw = RawRequest::from_json(&value).map_err(|source| Error::LoadRequest { path: path.clone(), source })?;
    let config = LoadConfig {
        target: args.target.clone(),
        request: pb::EvaluateRequest::from(raw),
        concurrency: args.concurrency,
        connections: args.connections,
        duration: Duration::from_secs(args.duration.max(1)),
        warmup: Duration::from_secs(args.warmup),
        connect: args.client.connect(None)?,
    };
    block_on(Threads::Many, async {
        let baseline = match &args.baseline {
            None => None,
            Some(addr) => {
                // An explicit http:// baseline is plaintext whatever the TLS flags (TLS against
                // plaintext, on the same machine).
                let connect = if addr.starts_with("http://") {
                    crate::grpc::client::Connect { token: config.connect.token.clone(), ..Default::default() }
                } else {
                    config.connect.clone()
                };
                let r = run(LoadConfig { target: addr.clone(), connect, ..config.clone() }).await?;
                print_report(&format!("baseline {addr}"), &r)?;
                Some(r)
            }
        };
        let r = run(config).await?;
        print_report(&format!("target   {}", args.target), &r)?;
        if let Some(b) = baseline {
            outln!(
                "target / baseline: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
                r.per_second / b.per_second.max(f64::EPSILON),
                r.p50_us as f64 / b.p50_us.max(1) as f64,
                r.p99_us as f64 / b.p99_us.max(1) as f64
            )?;
        }
        Ok(ExitCode::from(if r.errors == 0 { exit::OK } else { exit::FAILURE }))
    })?
}

fn print_report(label: &str, r: &LoadReport) -> Result<(), Error> {
    outln!(
        "{label}: {} requests in {:.1} s: {:.0} req/s; latency p50 {} us, p90 {} us, p99 {} us, max {} us; \
         {} allow, {} deny, {} errors",
        r.requests,
        r.seconds,
        r.per_second,
        r.p50_us,
        r.p90_us,
        r.p99_us,
        r.max_us,
        r.allows,
        r.denies,
        r.errors
    )?;
    if let Some(e) = &r.first_error {
        outln!("{label}: first error: {e}")?;
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct NoopArgs {
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
}

pub fn run_noop(args: NoopArgs) -> Result<ExitCode, Error> {
    block_on(Threads::Many, async {
        let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|source| Error::Listen {
            flag: "listen",
            addr: args.listen,
            source,
        })?;
        errln!("agentca noop listening on {}", listener.local_addr().map_or(args.listen, |a| a));
        serve_noop(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(ExitCode::SUCCESS)
    })?
}
