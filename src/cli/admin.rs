//! `agentca admin …`: live signals, status and reload, sent to a running server.

use std::process::ExitCode;

use clap::Subcommand;

use crate::input::printable;

use crate::grpc::client::Admin;
use crate::grpc::pb;

use super::{Error, Threads, block_on, exit};

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The running server: `host:port`, or an `http://` or `https://` URL.
    #[arg(long, default_value = "127.0.0.1:50051", env = "AGENTCA_SERVER")]
    server: String,
    /// The server's admin token (prefer --token-file: a command line is visible to others).
    #[arg(long, env = "AGENTCA_ADMIN_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    #[command(flatten)]
    client: super::ClientArgs,
    /// Who sends the signal (recorded with it); defaults to $USER.
    #[arg(long, env = "USER", default_value = "cli")]
    actor: String,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Disable one agent instance: every request for it is denied from the next one on.
    DisableAgent(Target),
    EnableAgent(Target),
    /// Disable a blueprint: all its agents, present and future.
    DisableBlueprint(Target),
    EnableBlueprint(Target),
    /// Mark a sponsor inactive (left the company): their agents are denied.
    SponsorInactive(Target),
    SponsorActive(Target),
    /// Set an agent's risk level.
    Risk {
        id: String,
        #[arg(value_parser = ["none", "low", "medium", "high"])]
        level: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Confirm an agent compromised: its risk becomes high.
    ConfirmCompromised(Target),
    /// Confirm an agent safe: its risk becomes none.
    ConfirmSafe(Target),
    /// Dismiss an agent's risk: it becomes none.
    DismissRisk(Target),
    /// Remove the live signals of an agent, blueprint or sponsor: the directory's values apply again.
    Clear {
        id: String,
        /// Only this live value.
        #[arg(long, value_parser = ["agent_enabled", "agent_risk", "blueprint_enabled", "sponsor_active"])]
        field: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The live signals in force.
    List,
    /// The served revision, reload errors, audit counters.
    Status,
    /// Reload the bundle now.
    Reload,
}

#[derive(Debug, clap::Args)]
struct Target {
    id: String,
    /// Why (shown in decisions and the audit log).
    #[arg(long, default_value = "")]
    reason: String,
}

pub fn run(args: AdminArgs) -> Result<ExitCode, Error> {
    block_on(Threads::One, send(args))?
}

async fn send(args: AdminArgs) -> Result<ExitCode, Error> {
    let connect = args.client.connect(args.token.as_deref())?;
    let mut admin = Admin::connect(&args.server, &connect).await?;
    let signal = |kind: &str, t: &Target| pb::SignalRequest {
        kind: kind.into(),
        target: t.id.clone(),
        risk: String::new(),
        reason: t.reason.clone(),
        actor: args.actor.clone(),
        field: String::new(),
    };
    let request = match &args.command {
        AdminCommand::DisableAgent(t) => signal("disable_agent", t),
        AdminCommand::EnableAgent(t) => signal("enable_agent", t),
        AdminCommand::DisableBlueprint(t) => signal("disable_blueprint", t),
        AdminCommand::EnableBlueprint(t) => signal("enable_blueprint", t),
        AdminCommand::SponsorInactive(t) => signal("sponsor_inactive", t),
        AdminCommand::SponsorActive(t) => signal("sponsor_active", t),
        AdminCommand::ConfirmCompromised(t) => signal("confirm_compromised", t),
        AdminCommand::ConfirmSafe(t) => signal("confirm_safe", t),
        AdminCommand::DismissRisk(t) => signal("dismiss_risk", t),
        AdminCommand::Risk { id, level, reason } => pb::SignalRequest {
            kind: "set_risk".into(),
            target: id.clone(),
            risk: level.clone(),
            reason: reason.clone(),
            actor: args.actor.clone(),
            field: String::new(),
        },
        AdminCommand::Clear { id, field, reason } => pb::SignalRequest {
            kind: "clear".into(),
            target: id.clone(),
            risk: String::new(),
            reason: reason.clone(),
            actor: args.actor.clone(),
            field: field.clone().unwrap_or_default(),
        },
        AdminCommand::List => {
            let list = admin.list().await?;
            if list.is_empty() {
                outln!("no live signals")?;
            }
            for s in list {
                print_signal(&s)?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        AdminCommand::Status => {
            let s = admin.status().await?;
            outln!("revision       {}", s.revision)?;
            outln!("loaded at      {} ({} ms) from {}", s.loaded_at, s.load_ms, s.policies_dir)?;
            outln!("directory      {} policies, {} agents", s.policies, s.agents)?;
            if !s.last_reload_error.is_empty() {
                outln!(
                    "STALE          since {} ({} s): the last reload failed at {}:",
                    s.stale_since,
                    s.stale_seconds,
                    s.last_reload_error_at
                )?;
                for line in s.last_reload_error.lines() {
                    outln!("  {}", printable(line))?;
                }
            }
            if let Some(a) = s.audit {
                outln!(
                    "audit          {} ({}, on full: {}): seq {}, {} written, {} waited, {} refused{}",
                    printable(&a.sink),
                    a.durability,
                    a.on_full,
                    a.seq,
                    a.written,
                    a.waited,
                    a.refused,
                    if a.error.is_empty() { String::new() } else { format!(", ERROR: {}", printable(&a.error)) }
                )?;
                if !a.notice.is_empty() {
                    outln!("audit notice   {}", printable(&a.notice))?;
                }
            }
            outln!(
                "live signals   {} ({} for ids the directory lacks; at most {})",
                s.live_signals,
                s.unknown_target_signals,
                s.max_unknown_target_signals
            )?;
            if !s.signals_error.is_empty() {
                outln!("SIGNALS ERROR  {}", printable(&s.signals_error))?;
            }
            if let Some(t) = &s.tls {
                outln!(
                    "tls            {} until {} (sha256 {}), loaded at {}; client certificates {}; {} failed handshakes",
                    printable(if t.identity.is_empty() { "(no name)" } else { &t.identity }),
                    t.not_after,
                    t.fingerprint,
                    t.loaded_at,
                    if t.client_auth { "required" } else { "not asked for" },
                    t.handshakes_failed + t.handshakes_timed_out
                )?;
                if !t.reload_error.is_empty() {
                    outln!(
                        "TLS RELOAD     failed at {}; still serving the certificate above: {}",
                        t.reload_error_at,
                        printable(&t.reload_error)
                    )?;
                }
            }
            if let Some(a) = &s.access {
                outln!(
                    "access         {}: refused {} without credentials, {} with a bad token, {} without the role",
                    printable(&a.file),
                    a.refused_no_credentials,
                    a.refused_bad_token,
                    a.refused_no_role
                )?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        AdminCommand::Reload => {
            let r = admin.reload().await?;
            match r.outcome.as_str() {
                "failed" => {
                    outln!("reload failed; still serving {}:\n{}", r.revision, r.error)?;
                    return Ok(ExitCode::from(exit::FAILURE));
                }
                "unchanged" => outln!("unchanged: {}", r.revision)?,
                _ => outln!("swapped {} -> {}", r.previous_revision, r.revision)?,
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let done = admin.signal(request).await?;
    if let Some(s) = &done.signal {
        out!("journaled as #{}: ", done.seq)?;
        print_signal(s)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_signal(s: &pb::LiveSignal) -> Result<(), Error> {
    let unknown = if s.unknown_target { " (not in the served directory)" } else { "" };
    let reason = if s.reason.is_empty() { String::new() } else { format!(": {}", printable(&s.reason)) };
    outln!(
        "{} {} = {}{unknown}, by {} at {}{reason}",
        printable(&s.field),
        printable(&s.target),
        printable(&s.value),
        printable(&s.actor),
        printable(&s.at)
    )
}
