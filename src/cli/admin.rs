//! `agentca admin …`: live signals, status and reload, sent to a running server.

use std::process::ExitCode;

use clap::Subcommand;

use crate::input::printable;

use crate::grpc::client::{Admin, ClientError};
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
    /// The replicas of the server's fleet (`serve --live`): revision, applied sequence, and
    /// what disagrees. Exits 4 if any replica is unhealthy, lags, or serves another revision.
    Fleet,
    /// Apply a live directory change from FILE (or `-`, standard input):
    /// {"upsert": {<directory.json sections>}, "remove": {"agents": [ids], …}}. Checked whole,
    /// journaled, effective on the next request, kept across reloads.
    ApplyDirectory {
        /// The change document, or `-` for standard input.
        file: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Write the directory served (the bundle's with the live changes over it) as a
    /// `directory.json` document: to fold the live changes into the bundle, write it over the
    /// bundle's `directory.json`; the next reload drops the live changes it now holds.
    ExportDirectory {
        /// Write here (atomically: aside, then renamed over) instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
struct Target {
    id: String,
    /// Why (shown in decisions and the audit log).
    #[arg(long, default_value = "")]
    reason: String,
}

/// The largest change document `apply-directory` reads.
const MAX_CHANGE_BYTES: u64 = 256 << 20;

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
                "live directory change #{}: {} objects set or removed over directory.json",
                s.live_directory_seq,
                s.live_directory_objects
            )?;
            if !s.live_directory_error.is_empty() {
                outln!("DIRECTORY JOURNAL ERROR {}", printable(&s.live_directory_error))?;
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
            if let Some(l) = &s.live {
                let stale = match l.stale_seconds {
                    -1 => "never in step with it".to_string(),
                    0 => "in step".to_string(),
                    n => format!("STALE for {n} s (since {})", l.synced_at),
                };
                outln!(
                    "fleet          replica {} on stream {}: applied #{} of #{}, {}{}; {} replicas{}",
                    printable(&l.replica),
                    printable(&l.stream),
                    l.applied_seq,
                    l.stream_seq,
                    stale,
                    if l.connected { "" } else { ", NOT CONNECTED" },
                    l.replicas,
                    if l.revision_disagreement { ", REVISIONS DISAGREE (admin fleet)" } else { "" }
                )?;
                if !l.error.is_empty() {
                    outln!("FLEET ERROR    {}", printable(&l.error))?;
                }
                if l.denying {
                    outln!(
                        "DENYING        every request: live state older than {} s (--live-stale-policy deny)",
                        l.stale_after_seconds
                    )?;
                }
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
        AdminCommand::ApplyDirectory { file, reason } => {
            // Far above what a server takes in one message (--max-message-bytes, 4 MiB by
            // default), far below what would exhaust this process.
            let limit = MAX_CHANGE_BYTES;
            let json = if file == "-" {
                crate::input::read_capped(std::io::stdin().lock(), limit)
            } else {
                crate::input::read_file(std::path::Path::new(file), limit)
            }
            .map_err(|source| ClientError::Read { flag: "FILE", path: file.into(), source })?;
            let request = pb::DirectoryChange { json, actor: args.actor.clone(), reason: reason.clone() };
            let done = admin.apply_directory(request).await?;
            outln!("applied as #{} over {}: {}", done.seq, done.revision, printable(&done.summary))?;
            for w in &done.warnings {
                outln!("warning: {}", printable(w))?;
            }
            return unconfirmed(&done.unconfirmed_replicas);
        }
        AdminCommand::ExportDirectory { out } => {
            let (data, revision, live_seq) = admin.export_directory().await?;
            match out {
                None => {
                    use std::io::Write;
                    let mut stdout = std::io::stdout().lock();
                    stdout
                        .write_all(&data)
                        .and_then(|()| stdout.write_all(b"\n"))
                        .and_then(|()| stdout.flush())
                        .map_err(Error::Stdout)?;
                }
                Some(path) => {
                    write_atomically(path, &data).map_err(|source| Error::Write { path: path.clone(), source })?;
                    eprintln!(
                        "wrote {} ({} bytes): revision {revision} with live change #{live_seq}",
                        path.display(),
                        data.len()
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        AdminCommand::Fleet => {
            let f = admin.fleet().await?;
            outln!("stream at #{}; most replicas serve {}", f.stream_seq, printable(&f.majority_revision))?;
            let mut flagged = false;
            for r in &f.replicas {
                let mut flags = Vec::new();
                if !r.healthy {
                    flags.push(format!(
                        "UNHEALTHY{}",
                        if r.error.is_empty() { String::new() } else { format!(" ({})", printable(&r.error)) }
                    ));
                }
                if r.lag > 0 {
                    flags.push(format!("LAGGING {} behind", r.lag));
                }
                if r.other_revision {
                    flags.push("OTHER REVISION".into());
                }
                flagged |= !flags.is_empty();
                outln!(
                    "{}{} at {}: revision {}, applied #{}, up since {}, seen {} ms ago{}{}",
                    printable(&r.id),
                    if r.this { " (this one)" } else { "" },
                    printable(&r.address),
                    printable(&r.revision),
                    r.applied_seq,
                    r.started_at,
                    r.seen_ms_ago,
                    if flags.is_empty() { "" } else { ": " },
                    flags.join(", ")
                )?;
            }
            return Ok(ExitCode::from(if flagged { exit::UNCONFIRMED } else { exit::OK }));
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
    unconfirmed(&done.unconfirmed_replicas)
}

/// Names the replicas of a fleet that had not confirmed a change (exit 4), if any did not.
fn unconfirmed(replicas: &[String]) -> Result<ExitCode, Error> {
    if replicas.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let names: Vec<String> = replicas.iter().map(|r| printable(r).to_string()).collect();
    outln!(
        "NOT CONFIRMED by {}: the change is in the fleet's stream and they apply it when they read it; until then \
         they decide without it",
        names.join(", ")
    )?;
    Ok(ExitCode::from(exit::UNCONFIRMED))
}

/// Writes `data` beside `path`, syncs it, and renames it over `path`: a reader (a bundle
/// watcher) sees the old file or the new one, never half of one. A link is written through
/// (the file it leads to is replaced, the link stays); anything but a regular file at the end
/// (a device, a FIFO, a folder) is refused, never replaced.
fn write_atomically(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    // Follow links (a chain of them, to a file that may not exist yet), as opening would.
    let mut target = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => {
                let next = std::fs::read_link(&target)?;
                target = target.parent().map_or(next.clone(), |dir| dir.join(&next));
            }
            _ => break,
        }
    }
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(std::io::Error::other("too many links, or a loop of them"));
    }
    let existing = std::fs::metadata(&target).ok();
    if existing.as_ref().is_some_and(|m| !m.is_file()) {
        return Err(std::io::Error::other(
            "not a regular file: a directory is written to a file, never over anything else",
        ));
    }
    let name = target.file_name().ok_or_else(|| std::io::Error::other("not a file name"))?;
    let tmp = target.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let mut f = std::fs::File::create(&tmp)?;
    // The file it replaces keeps its mode (a directory may be readable by its owner only).
    let kept = existing.map_or(Ok(()), |m| f.set_permissions(m.permissions()));
    let written = kept.and_then(|()| f.write_all(data)).and_then(|()| f.write_all(b"\n")).and_then(|()| f.sync_all());
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &target)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
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
