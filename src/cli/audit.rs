//! `agentca audit verify PATH…`: check the hash chain of audit files.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::audit::{Verified, verify};

use super::{Error, exit};

/// Exit 0 if the chain is intact, 1 (not an error: the answer) if it is broken.
pub fn verify_files(paths: &[PathBuf], partial: bool) -> Result<ExitCode, Error> {
    let code = match verify(paths) {
        Ok(v) if !v.from_genesis && !partial => {
            outln!(
                "broken: the chain starts at seq {} and not at the first record: {} records before it are missing \
                 (pass --partial if older files were removed on purpose)",
                v.first_seq,
                v.first_seq.saturating_sub(1)
            )?;
            print_first_note(&v)?;
            exit::FAILURE
        }
        Ok(v) => {
            let start = if v.from_genesis {
                "from the start of the chain".to_string()
            } else {
                format!("from seq {}", v.first_seq)
            };
            outln!(
                "intact: {} records, seq {}..{} ({start}); last hash {}",
                v.records,
                v.first_seq,
                v.last_seq,
                v.last_hash
            )?;
            print_first_note(&v)?;
            exit::OK
        }
        Err(broken) => {
            outln!("broken: {broken}")?;
            exit::FAILURE
        }
    };
    Ok(ExitCode::from(code))
}

/// A chain that does not start at its beginning may say why in its first record.
fn print_first_note(v: &Verified) -> Result<(), Error> {
    if !v.from_genesis
        && let Some(note) = &v.first_note
    {
        outln!("its first record is a recovery record: {note}")?;
    }
    Ok(())
}
