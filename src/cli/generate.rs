//! `agentca generate`: write a large synthetic bundle, deterministic from a seed.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::generate::{Params, write_bundle};

use super::Error;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The folder to write (must not hold .cedar files yet).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 100_000)]
    agents: usize,
    #[arg(long, default_value_t = 1_000)]
    blueprints: usize,
    #[arg(long, default_value_t = 2_000)]
    sponsors: usize,
    /// All policies: about ten unscoped, the rest agent-, blueprint- and sponsor-scoped.
    #[arg(long, default_value_t = 10_000)]
    policies: usize,
    #[arg(long, default_value_t = 50)]
    resources: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(args: GenerateArgs) -> Result<ExitCode, Error> {
    let params = Params {
        agents: args.agents,
        blueprints: args.blueprints,
        sponsors: args.sponsors,
        policies: args.policies,
        resources: args.resources,
        seed: args.seed,
    };
    let summary =
        write_bundle(&args.out, &params).map_err(|source| Error::Generate { dir: args.out.clone(), source })?;
    outln!(
        "wrote {} policies and {} agents to {} ({} files)",
        summary.policies,
        summary.agents,
        args.out.display(),
        summary.files.len()
    )?;
    let p = &summary.probe;
    outln!(
        "a request to try: {{\"agent\": \"{}\", \"resource\": \"{}\", \"scopes\": {:?}}}",
        p.agent,
        p.resource,
        p.scopes
    )?;
    Ok(ExitCode::SUCCESS)
}
