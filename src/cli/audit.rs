//! `agentca audit verify PATH…`: check the hash chain of audit files.

use std::path::PathBuf;

use crate::audit::verify;

use super::exit;

pub fn verify_files(paths: &[PathBuf], partial: bool) -> u8 {
    match verify(paths) {
        Ok(v) if !v.from_genesis && !partial => {
            outln!(
                "broken: the chain starts at seq {} and not at the first record: {} records before it are missing \
                 (pass --partial if older files were removed on purpose)",
                v.first_seq,
                v.first_seq.saturating_sub(1)
            );
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
            );
            exit::OK
        }
        Err(broken) => {
            outln!("broken: {broken}");
            exit::FAILURE
        }
    }
}
