//! `agentca loadgen`: drive Evaluate with N requests in flight over M connections for T
//! seconds; `agentca noop-serve`: the no-op baseline server to compare with.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::grpc::load::{LoadConfig, run, serve_noop};
use crate::grpc::pb;
use crate::request::RawRequest;

use super::exit;

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
    /// Also load this server (e.g. `agentca noop-serve`) the same way, first, and compare.
    #[arg(long, value_name = "ADDR")]
    baseline: Option<String>,
}

pub fn run_load(args: LoadArgs) -> u8 {
    let text = match std::fs::read_to_string(&args.request) {
        Ok(t) => t,
        Err(e) => {
            errln!("agentca: cannot read `{}`: {e}", args.request.display());
            return exit::FAILURE;
        }
    };
    let request = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => match RawRequest::from_json(&v) {
            Ok(raw) => pb::EvaluateRequest::from(raw),
            Err(e) => {
                errln!("agentca: invalid request `{}`: {e}", args.request.display());
                return exit::FAILURE;
            }
        },
        Err(e) => {
            errln!("agentca: `{}` is not JSON: {e}", args.request.display());
            return exit::FAILURE;
        }
    };
    let config = LoadConfig {
        target: args.target.clone(),
        request,
        concurrency: args.concurrency,
        connections: args.connections,
        duration: Duration::from_secs(args.duration.max(1)),
        warmup: Duration::from_secs(args.warmup),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            errln!("agentca: cannot start the runtime: {e}");
            return exit::FAILURE;
        }
    };
    let baseline = match &args.baseline {
        None => None,
        Some(addr) => match runtime.block_on(run(LoadConfig { target: addr.clone(), ..config.clone() })) {
            Ok(r) => {
                print_report(&format!("baseline {addr}"), &r);
                Some(r)
            }
            Err(e) => {
                errln!("agentca: {e}");
                return exit::FAILURE;
            }
        },
    };
    match runtime.block_on(run(config)) {
        Ok(r) => {
            print_report(&format!("target   {}", args.target), &r);
            if let Some(b) = baseline {
                outln!(
                    "target / baseline: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
                    r.per_second / b.per_second.max(f64::EPSILON),
                    r.p50_us as f64 / b.p50_us.max(1) as f64,
                    r.p99_us as f64 / b.p99_us.max(1) as f64
                );
            }
            if r.errors == 0 { exit::OK } else { exit::FAILURE }
        }
        Err(e) => {
            errln!("agentca: {e}");
            exit::FAILURE
        }
    }
}

fn print_report(label: &str, r: &crate::grpc::load::LoadReport) {
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
    );
    if let Some(e) = &r.first_error {
        outln!("{label}: first error: {e}");
    }
}

#[derive(Debug, clap::Args)]
pub struct NoopArgs {
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
}

pub fn run_noop(args: NoopArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            errln!("agentca: cannot start the runtime: {e}");
            return exit::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                errln!("agentca: cannot listen on {}: {e}", args.listen);
                return exit::FAILURE;
            }
        };
        errln!("agentca noop listening on {}", listener.local_addr().map_or(args.listen, |a| a));
        match serve_noop(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        {
            Ok(()) => exit::OK,
            Err(e) => {
                errln!("agentca: {e}");
                exit::FAILURE
            }
        }
    })
}
