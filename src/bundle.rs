//! Reads a policies/ folder: the schema, the `*.cedar` files (ids from `@id`), the directory,
//! the named locations, and the content-hash revision. Every error names its file, and for
//! policies the line and column.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{Effect, Policy, PolicyId, PolicySet, Schema, SchemaFragment, ValidationMode, Validator};
use cedar_policy_core::ast;
use cedar_policy_core::validator::ValidatorEntityTypeKind;
use ipnetwork::IpNetwork;
use miette::Diagnostic;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cedar;
use crate::directory::Directory;
use crate::input;
use crate::input::printable;
use crate::nesting;

pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// Longest `@reason` of a policy, in bytes.
pub const MAX_REASON_LEN: usize = 4096;
pub const DIRECTORY_FILE: &str = "directory.json";
pub const LOCATIONS_FILE: &str = "locations.json";

/// The stack of the thread that parses and validates the policies and the schema.
const PARSE_STACK_BYTES: usize = 64 << 20;

/// The three states of a Conditional Access policy (`@state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PolicyState {
    #[serde(rename = "on")]
    On,
    #[serde(rename = "off")]
    Off,
    #[serde(rename = "report-only")]
    ReportOnly,
}

impl PolicyState {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyState::On => "on",
            PolicyState::Off => "off",
            PolicyState::ReportOnly => "report-only",
        }
    }
}

/// One policy of the bundle, renamed to its `@id`, with where it was written.
#[derive(Debug, Clone)]
pub struct BundlePolicy {
    pub policy: Policy,
    pub id: Arc<str>,
    pub effect: Effect,
    pub state: PolicyState,
    pub reason: Arc<str>,
    pub file: String,
    pub line: usize,
    pub column: usize,
}

/// Named locations (`locations.json`): a name and the networks it covers.
/// A problem with `locations.json`: names the location.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    #[error("{}:{}: {source}", .source.line(), .source.column())]
    Syntax { source: serde_json::Error },
    #[error("expected an object of location names to lists of networks")]
    NotAnObject,
    #[error("location `{}`: a name must not be empty or hold control or bidirectional characters", printable(.0))]
    BadName(String),
    #[error("location `{0}`: expected an array of networks such as \"10.0.0.0/8\"")]
    NotAList(String),
    #[error("location `{name}`: `{}` is not a network: {error}", input::shown(.given))]
    BadNetwork { name: String, given: String, error: ipnetwork::IpNetworkError },
    #[error("location `{name}`: expected a string such as \"10.0.0.0/8\", found {found}")]
    NotAString { name: String, found: Value },
}

#[derive(Debug, Clone, Default)]
pub struct Locations(Vec<(Arc<str>, Vec<IpNetwork>)>);

impl Locations {
    /// The names of the locations that contain `ip`, in file order.
    pub fn containing(&self, ip: IpAddr) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().filter(move |(_, nets)| nets.iter().any(|n| n.contains(ip))).map(|(name, _)| name)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn from_json_str(src: &str) -> Result<Locations, Vec<LocationError>> {
        let root: Value = input::parse_json(src).map_err(|source| vec![LocationError::Syntax { source }])?;
        let Value::Object(map) = root else {
            return Err(vec![LocationError::NotAnObject]);
        };
        let mut errors = Vec::new();
        let mut out = Vec::with_capacity(map.len());
        for (name, nets) in map {
            if name.is_empty() || name.chars().any(crate::input::is_unsafe_char) {
                errors.push(LocationError::BadName(name));
                continue;
            }
            let Value::Array(items) = nets else {
                errors.push(LocationError::NotAList(name));
                continue;
            };
            let mut parsed = Vec::with_capacity(items.len());
            for item in items {
                match item.as_str().map(|s| (s, IpNetwork::from_str(s.trim()))) {
                    Some((_, Ok(net))) => parsed.push(net),
                    Some((s, Err(e))) => {
                        errors.push(LocationError::BadNetwork { name: name.clone(), given: s.to_string(), error: e })
                    }
                    None => errors.push(LocationError::NotAString { name: name.clone(), found: item }),
                }
            }
            out.push((Arc::from(name.as_str()), parsed));
        }
        if errors.is_empty() { Ok(Locations(out)) } else { Err(errors) }
    }
}

/// One problem with a bundle: the file, and where known the line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl BundleError {
    fn in_file(file: &str, message: impl Into<String>) -> Self {
        BundleError { file: file.to_string(), line: None, column: None, message: message.into() }
    }

    fn at(file: &str, src: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, column) = line_column(src, offset);
        BundleError { file: file.to_string(), line: Some(line), column: Some(column), message: message.into() }
    }
}

impl fmt::Display for BundleError {
    /// One line, whatever the file's name or the text quoted: unsafe characters are escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (file, message) = (printable(&self.file), printable(&self.message));
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{file}:{l}:{c}: {message}"),
            _ => write!(f, "{file}: {message}"),
        }
    }
}

/// Every problem found in a bundle, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleErrors(pub Vec<BundleError>);

impl fmt::Display for BundleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for BundleErrors {}

impl From<BundleError> for BundleErrors {
    fn from(e: BundleError) -> Self {
        BundleErrors(vec![e])
    }
}

/// A bundle, parsed and validated.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    schema: Schema,
    /// In file order, then order within the file.
    policies: Vec<BundlePolicy>,
    directory: Directory,
    /// The content hash of `directory.json` alone: a reload whose file has the same one keeps
    /// the directory it has.
    directory_hash: [u8; 32],
    locations: Locations,
    revision: String,
    warnings: Vec<String>,
}

impl Bundle {
    /// Reads and validates the bundle in `dir`. All problems are reported, not just the first.
    pub fn load(dir: &Path) -> Result<Bundle, BundleErrors> {
        Bundle::load_reusing(dir, None)
    }

    /// As [`Bundle::load`], keeping `previous`'s directory if `directory.json` is unchanged
    /// (a reload of policies only does not read the directory again).
    pub fn load_reusing(dir: &Path, previous: Option<&Bundle>) -> Result<Bundle, BundleErrors> {
        let display = |name: &str| dir.join(name).display().to_string();
        let Listing { names: cedar_files, problems, notes } = list_cedar_files(dir).map_err(|e| {
            BundleErrors::from(BundleError::in_file(&dir.display().to_string(), format!("cannot read the folder: {e}")))
        })?;

        // Read everything first, in a fixed order, for the revision. An entry that is there but
        // cannot be read (a dangling link, a folder, a FIFO) makes the bundle invalid: skipping it
        // would serve a bundle without its forbids.
        let mut errors: Vec<BundleError> =
            problems.into_iter().map(|(name, message)| BundleError::in_file(&display(&name), message)).collect();
        let mut hasher = Sha256::new();
        let mut read = |name: &str, limit: u64, required: bool, errors: &mut Vec<BundleError>| -> Option<String> {
            match input::read_file(&dir.join(name), limit) {
                Ok(src) => {
                    // Length-prefixed so that moving bytes between files changes the revision.
                    hasher.update(name.as_bytes());
                    hasher.update([0]);
                    hasher.update((src.len() as u64).to_be_bytes());
                    hasher.update(src.as_bytes());
                    Some(src)
                }
                Err(e) if e.is_not_found() && !required => None,
                Err(e) => {
                    errors.push(BundleError::in_file(&display(name), e.to_string()));
                    None
                }
            }
        };
        let schema_src = read(SCHEMA_FILE, input::MAX_SCHEMA_BYTES, true, &mut errors);
        let cedar_srcs: Vec<(String, String)> = cedar_files
            .iter()
            .filter_map(|name| {
                read(name, input::MAX_POLICY_FILE_BYTES, true, &mut errors).map(|src| (display(name), src))
            })
            .collect();
        let directory_src = read(DIRECTORY_FILE, input::MAX_DIRECTORY_BYTES, true, &mut errors);
        let directory_hash: [u8; 32] = directory_src.as_deref().map_or([0; 32], |src| Sha256::digest(src).into());
        let kept = previous.filter(|p| directory_src.is_some() && p.directory_hash == directory_hash);
        let locations_src = read(LOCATIONS_FILE, input::MAX_LOCATIONS_BYTES, false, &mut errors);
        let revision = format!("sha256:{}", hex::encode(hasher.finalize()));

        // The policies are parsed and validated beside the directory. The directory (the bulk
        // of a large bundle) stays on this thread, whose memory the entities then reuse.
        let schema_file = display(SCHEMA_FILE);
        let (parsed, directory) = std::thread::scope(|scope| {
            // Cedar's parser recurses once per level of nesting, with large frames in a debug
            // build: the nesting check keeps the depth bounded, and this stack holds that depth
            // many times over. It is only address space until the parser touches it.
            let parsed = parser_thread()
                .spawn_scoped(scope, || parse_and_validate(&schema_file, schema_src.as_deref(), &cedar_srcs));
            let directory = match kept {
                Some(p) => Some(Ok(p.directory.clone())),
                None => directory_src.as_deref().map(Directory::from_json_str),
            };
            let parsed = match parsed {
                Ok(handle) => handle.join().map_err(|_| "the policy parser failed".to_string()),
                Err(e) => Err(format!("cannot start the policy parser: {e}")),
            };
            (parsed, directory)
        });
        let Parsed { schema, policies, errors: policy_errors, validation_errors, mut warnings } =
            parsed.map_err(|message| BundleError::in_file(&dir.display().to_string(), message))?;
        errors.extend(policy_errors);
        warnings.extend(notes.into_iter().map(|(name, note)| format!("{}: {note}", display(&name))));
        let directory = match directory {
            Some(Ok(d)) => {
                warnings.extend(d.warnings().iter().map(|w| format!("{}: {w}", display(DIRECTORY_FILE))));
                Some(d)
            }
            Some(Err(errs)) => {
                errors.extend(errs.into_iter().map(|e| BundleError::in_file(&display(DIRECTORY_FILE), e.to_string())));
                None
            }
            None => None,
        };
        let locations = match locations_src {
            None => Locations::default(),
            Some(src) => Locations::from_json_str(&src).unwrap_or_else(|errs| {
                errors.extend(errs.iter().map(|e| BundleError::in_file(&display(LOCATIONS_FILE), e.to_string())));
                Locations::default()
            }),
        };
        errors.extend(validation_errors);
        if policies.is_empty() && errors.is_empty() {
            warnings.push(format!("{}: no policies: every request will be denied (no_permit)", dir.display()));
        }
        match (schema, directory) {
            (Some(schema), Some(directory)) if errors.is_empty() => Ok(Bundle {
                dir: dir.to_path_buf(),
                schema,
                policies,
                directory,
                directory_hash,
                locations,
                revision,
                warnings,
            }),
            _ => Err(BundleErrors(errors)),
        }
    }

    /// The folder the bundle was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// In file order, then order within the file.
    pub fn policies(&self) -> &[BundlePolicy] {
        &self.policies
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    pub fn locations(&self) -> &Locations {
        &self.locations
    }

    /// The content hash of the files read (`sha256:…`).
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// What the files left out or ignored, each naming its file.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Parses and validates policy text against schema text, as a bundle of these two files would
/// be (nesting limits, `@id` and `@reason` rules, strict validation): the number of policies,
/// or every error, located in `policy_file`.
pub fn check_policy_text(schema_src: &str, policy_file: &str, policy_src: &str) -> Result<usize, BundleErrors> {
    let cedar_srcs = [(policy_file.to_string(), policy_src.to_string())];
    let parsed = parse_and_validate(SCHEMA_FILE, Some(schema_src), &cedar_srcs);
    let errors: Vec<BundleError> = parsed.errors.into_iter().chain(parsed.validation_errors).collect();
    if errors.is_empty() { Ok(parsed.policies.len()) } else { Err(BundleErrors(errors)) }
}

/// The schema and the policies, parsed and validated.
struct Parsed {
    schema: Option<Schema>,
    policies: Vec<BundlePolicy>,
    /// Schema and policy parse errors, duplicate ids.
    errors: Vec<BundleError>,
    validation_errors: Vec<BundleError>,
    warnings: Vec<String>,
}

fn parse_and_validate(schema_file: &str, schema_src: Option<&str>, cedar_srcs: &[(String, String)]) -> Parsed {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let schema = schema_src.filter(|src| check_schema_nesting(schema_file, src, &mut errors)).and_then(|src| {
        match Schema::from_cedarschema_str(src) {
            Ok((schema, schema_warnings)) => {
                warnings.extend(schema_warnings.map(|w| format!("{schema_file}: {w}")));
                Some(schema)
            }
            Err(e) => {
                errors.extend(diagnostic_errors(schema_file, src, &e));
                None
            }
        }
    });
    let mut policies = Vec::new();
    // Files are parsed apart from each other: a large bundle's files are split among threads.
    let bytes: usize = cedar_srcs.iter().map(|(_, src)| src.len()).sum();
    let parsed = in_parallel(
        cedar_srcs,
        bytes / PARALLEL_BYTES,
        |(_, src)| src.len(),
        |chunk| chunk.iter().map(|(file, src)| parse_file(file, src)).collect::<Vec<_>>(),
    );
    for result in parsed.into_iter().flatten() {
        match result {
            Ok(parsed) => policies.extend(parsed),
            Err(errs) => errors.extend(errs),
        }
    }
    check_unique_ids(&policies, &mut errors);
    let mut validation_errors = Vec::new();
    if let Some(schema) = &schema {
        let sources: HashMap<&str, &str> = cedar_srcs.iter().map(|(f, s)| (f.as_str(), s.as_str())).collect();
        validate_policies(schema, &policies, &sources, &mut validation_errors, &mut warnings);
    }
    Parsed { schema, policies, errors, validation_errors, warnings }
}

/// A bundle's policy text is parsed and validated on one thread per this many bytes (and
/// per this many policies, below), up to the machine's cores: Cedar's parse and strict
/// validation are most of the time a large bundle takes to load, and a small one is not
/// worth a thread.
const PARALLEL_BYTES: usize = 2 << 20;
const PARALLEL_POLICIES: usize = 10_000;

/// `work` over `items` cut into at most `chunks` contiguous runs of about equal `weight`
/// (at least one; no more than the machine's cores), each on its own thread with the
/// parser's stack; the results in the order of the runs.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    chunks: usize,
    weight: impl Fn(&T) -> usize,
    work: impl Fn(&[T]) -> R + Sync,
) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let chunks = chunks.clamp(1, cores.min(8)).min(items.len().max(1));
    if chunks == 1 {
        return vec![work(items)];
    }
    let total: usize = items.iter().map(&weight).sum::<usize>().max(1);
    let mut runs = Vec::with_capacity(chunks);
    let (mut start, mut acc) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        acc += weight(item);
        if acc * chunks >= total * (runs.len() + 1) && runs.len() + 1 < chunks {
            runs.push(&items[start..=i]);
            start = i + 1;
        }
    }
    if start < items.len() {
        runs.push(&items[start..]);
    }
    let work = &work;
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs.iter().map(|run| parser_thread().spawn_scoped(scope, move || work(run))).collect();
        // A thread that cannot be started leaves its run to this thread.
        handles
            .into_iter()
            .zip(&runs)
            .map(|(handle, run)| match handle {
                Ok(h) => h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(_) => work(run),
            })
            .collect()
    })
}

/// A thread for Cedar's parser and validator: named, and with the stack they need.
fn parser_thread() -> std::thread::Builder {
    std::thread::Builder::new().name("agentca-parse".into()).stack_size(PARSE_STACK_BYTES)
}

/// One `.cedar` file's policies, or what is wrong with it.
fn parse_file(file: &str, src: &str) -> Result<Vec<BundlePolicy>, Vec<BundleError>> {
    if let Err(e) = nesting::check_policies(src) {
        return Err(vec![nesting_error(file, src, &e)]);
    }
    parse_policies(file, src)
}

/// True if the schema nests shallowly enough for Cedar to read it; otherwise says why in `errors`.
fn check_schema_nesting(file: &str, src: &str, errors: &mut Vec<BundleError>) -> bool {
    let checked = nesting::check_schema_text(src).and_then(|()| {
        // Cedar's JSON form of the schema shows how common types use each other (the text
        // alone does not). Reading it does not resolve them; if it fails, so does the real parse.
        let json =
            SchemaFragment::from_cedarschema_str(src).ok().and_then(|(fragment, _)| fragment.to_json_value().ok());
        json.map_or(Ok(()), |json| nesting::check_schema_json(&json, src))
    });
    match checked {
        Ok(()) => true,
        Err(e) => {
            errors.push(nesting_error(file, src, &e));
            false
        }
    }
}

fn nesting_error(file: &str, src: &str, e: &nesting::NestingError) -> BundleError {
    match e.offset() {
        Some(offset) => BundleError::at(file, src, offset, e.to_string()),
        None => BundleError::in_file(file, e.to_string()),
    }
}

/// The `*.cedar` entries of the folder, sorted, whatever they are: one that is not a readable
/// file is an error when it is read, not a policy file quietly left out. Hidden entries (a
/// ConfigMap's `..data`, an editor's `.x.cedar.swp`) are skipped.
fn list_cedar_files(dir: &Path) -> std::io::Result<Listing> {
    let mut listing = Listing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let raw = entry.file_name();
        let name = raw.to_string_lossy().into_owned();
        let lower = name.trim_end().to_lowercase();
        if name.starts_with("..") {
            // A ConfigMap's own entries (`..data`, `..2026_…`): the files link into them.
            continue;
        }
        if name.starts_with('.') {
            if lower.ends_with(".cedar") {
                listing.notes.push((name, "a hidden file is not part of the bundle".into()));
            }
            continue;
        }
        if raw.to_str().is_none() && lower.ends_with(".cedar") {
            listing.problems.push((name, "the file name is not UTF-8: rename it".into()));
        } else if name.ends_with(".cedar") {
            listing.names.push(name);
        } else if lower.ends_with(".cedar") {
            // `baseline.CEDAR`, `baseline.cedar `: meant as policies, and silently left out
            // they would drop their forbids.
            listing.problems.push((name, "looks like a policy file but is not named `*.cedar`: rename it".into()));
        } else if name != "tests" && fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) && holds_cedar(&entry.path())
        {
            listing.notes.push((name, "policies in a subfolder are not part of the bundle".into()));
        }
    }
    listing.names.sort();
    Ok(listing)
}

/// The policy files of a folder, what is wrong with entries that look like policy files, and
/// notes on those left out on purpose (hidden files, subfolders).
#[derive(Default)]
struct Listing {
    names: Vec<String>,
    problems: Vec<(String, String)>,
    notes: Vec<(String, String)>,
}

/// True if the folder holds a `*.cedar` entry.
fn holds_cedar(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().to_lowercase().ends_with(".cedar"))
    })
}

/// Parses one file: each policy takes its `@id`, `@state` and `@reason`.
fn parse_policies(file: &str, src: &str) -> Result<Vec<BundlePolicy>, Vec<BundleError>> {
    let set = PolicySet::from_str(src)
        .map_err(|errs| errs.iter().flat_map(|e| diagnostic_errors(file, src, e)).collect::<Vec<_>>())?;
    let mut errors = Vec::new();
    if let Some(offset) = set.templates().map(|t| cedar::template_offset(t).unwrap_or(0)).min() {
        errors.push(BundleError::at(
            file,
            src,
            offset,
            "templates (policies with ?principal or ?resource) are not supported",
        ));
    }
    // In the order they appear in the file, where the parser saw each begin.
    let mut parsed: Vec<(usize, &Policy)> = set.policies().map(|p| (cedar::policy_offset(p).unwrap_or(0), p)).collect();
    parsed.sort_by_key(|(offset, _)| *offset);

    let mut out = Vec::with_capacity(parsed.len());
    // Line and column are carried forward from policy to policy: counting from the start of
    // the file for each one would be quadratic in the file's size.
    let mut position = Position::default();
    for (offset, policy) in parsed {
        let (line, column) = position.advance(src, offset);
        let err =
            |message: String| BundleError { file: file.to_string(), line: Some(line), column: Some(column), message };
        let (mut id_ann, mut state_ann, mut reason_ann) = (None, None, None);
        for (key, value) in policy.annotations() {
            match key {
                "id" => id_ann = Some(value),
                "state" => state_ann = Some(value),
                "reason" => reason_ann = Some(value),
                _ => {}
            }
        }
        let id = match id_ann {
            None => {
                errors.push(err("policy has no @id annotation: every policy needs a stable @id(\"…\")".into()));
                continue;
            }
            Some(id) if id.trim().is_empty() => {
                errors.push(err("@id must not be empty".into()));
                continue;
            }
            Some(id) if id.len() > crate::request::MAX_ID_LEN || id.chars().any(crate::input::is_unsafe_char) => {
                errors.push(err(format!(
                    "@id `{}` is not an id: at most {} bytes, without control or bidirectional characters",
                    crate::input::printable(&id.chars().take(80).collect::<String>()),
                    crate::request::MAX_ID_LEN
                )));
                continue;
            }
            Some(id) => id.to_string(),
        };
        // Every decision and audit record carries the reasons that decided it: they are
        // sentences, not documents, and they must print safely.
        if let Some(reason) = reason_ann
            && (reason.len() > MAX_REASON_LEN || reason.chars().any(crate::input::is_unsafe_char))
        {
            errors.push(err(format!(
                "policy `{}`: @reason must be at most {MAX_REASON_LEN} bytes, without control or bidirectional characters",
                crate::input::printable(&id)
            )));
            continue;
        }
        let state = match state_ann {
            None | Some("on") => PolicyState::On,
            Some("off") => PolicyState::Off,
            Some("report-only") => PolicyState::ReportOnly,
            Some(other) => {
                errors.push(err(format!(
                    "policy `{id}`: unknown @state `{}`: expected one of on, off, report-only",
                    crate::input::printable(other)
                )));
                continue;
            }
        };
        out.push(BundlePolicy {
            policy: policy.new_id(PolicyId::new(&id)),
            reason: Arc::from(reason_ann.unwrap_or_default()),
            id: Arc::from(id),
            effect: policy.effect(),
            state,
            file: file.to_string(),
            line,
            column,
        });
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

fn check_unique_ids(policies: &[BundlePolicy], errors: &mut Vec<BundleError>) {
    let mut seen: HashMap<&str, &BundlePolicy> = HashMap::new();
    for p in policies {
        if let Some(first) = seen.insert(&p.id, p) {
            errors.push(BundleError {
                file: p.file.clone(),
                line: Some(p.line),
                column: Some(p.column),
                message: format!(
                    "duplicate @id `{}`: first defined at {}:{}:{}",
                    p.id, first.file, first.line, first.column
                ),
            });
            seen.insert(&first.id, first);
        }
    }
}

/// Strict validation of every policy (off ones too) against the schema.
fn validate_policies(
    schema: &Schema,
    policies: &[BundlePolicy],
    sources: &HashMap<&str, &str>,
    errors: &mut Vec<BundleError>,
    warnings: &mut Vec<String>,
) {
    // Policies are validated apart from each other: a large bundle's are split among threads.
    validate_in_runs(policies.len() / PARALLEL_POLICIES, schema, policies, sources, errors, warnings);
}

/// As `validate_policies`, with the policies cut into at most `runs` runs.
fn validate_in_runs(
    runs: usize,
    schema: &Schema,
    policies: &[BundlePolicy],
    sources: &HashMap<&str, &str>,
    errors: &mut Vec<BundleError>,
    warnings: &mut Vec<String>,
) {
    let by_id: HashMap<&str, &BundlePolicy> = policies.iter().map(|p| (&*p.id, p)).collect();
    let results = in_parallel(policies, runs, |_| 1, |chunk| validate_by_shape(schema, chunk));
    for result in results.iter().flatten() {
        report_validation(result, &by_id, sources, errors, warnings);
    }
}

/// Strict validation of `policies`, one policy of each [`Shape`] first: the others of a shape
/// whose first policy validates without an error or a warning validate alike, and are not
/// validated again; those of any other shape are, each on its own, for their own findings.
/// A large bundle's policies are mostly a few shapes (one per rule, over many agents), and
/// validation is about a third of its load.
fn validate_by_shape(schema: &Schema, policies: &[BundlePolicy]) -> [cedar_policy::ValidationResult; 2] {
    let validator = Validator::new(schema.clone());
    let mut first = PolicySet::new();
    // Each shape's first policy, by id; the others with the id of their shape's first.
    let mut shapes: HashMap<Shape<'_>, &str> = HashMap::new();
    let mut others: Vec<(&BundlePolicy, &str)> = Vec::new();
    for p in policies {
        match shapes.entry(Shape::of(p, schema)) {
            Entry::Occupied(known) => others.push((p, known.get())),
            // A duplicate @id is already reported (the bundle is invalid); within a run the
            // first policy of that id is validated, across runs each is.
            Entry::Vacant(shape) => {
                if first.add(p.policy.clone()).is_ok() {
                    shape.insert(&p.id);
                }
            }
        }
    }
    let first = validator.validate(&first, ValidationMode::Strict);
    let found: HashSet<String> = first
        .validation_errors()
        .map(|e| e.policy_id().to_string())
        .chain(first.validation_warnings().map(|w| w.policy_id().to_string()))
        .collect();
    let mut again = PolicySet::new();
    for (p, first_of_shape) in others {
        if found.contains(first_of_shape) {
            let _ = again.add(p.policy.clone());
        }
    }
    let again = validator.validate(&again, ValidationMode::Strict);
    [first, again]
}

/// What strict validation reads of a static policy: its effect, its action scope and its
/// conditions whole (Cedar's own shape equality: every literal, no source positions), and the
/// principal and resource scopes, where an entity's id is left out when the validator reads
/// only the entity's type. It reads the id of an action (it must exist, and `in` follows the
/// action groups) and of an entity of an enumerated type (it must be one of the values), and
/// looks at every id for characters that could mislead a reader (bidirectional controls,
/// mixed scripts, invisible characters), which printable ASCII never holds; so those ids are
/// kept. Annotations are not read. The differential test checks this against validating
/// every policy.
#[derive(PartialEq, Eq, Hash)]
struct Shape<'a> {
    effect: Effect,
    principal: ScopeShape<'a>,
    action: &'a ast::ActionConstraint,
    resource: ScopeShape<'a>,
    body: Option<ast::ExprShapeOnly<'a, ()>>,
}

#[derive(PartialEq, Eq, Hash)]
enum ScopeShape<'a> {
    Any,
    In(EntityShape<'a>),
    Eq(EntityShape<'a>),
    Is(&'a ast::EntityType),
    IsIn(&'a ast::EntityType, EntityShape<'a>),
    /// A template slot: never part of a loaded bundle, kept whole.
    Other(&'a ast::PrincipalOrResourceConstraint),
}

/// A scope's entity: its type, and its id unless the validator reads the type alone.
#[derive(PartialEq, Eq, Hash)]
struct EntityShape<'a> {
    ty: &'a ast::EntityType,
    id: Option<&'a str>,
}

impl<'a> Shape<'a> {
    fn of(p: &'a BundlePolicy, schema: &Schema) -> Shape<'a> {
        let policy: &ast::Policy = p.policy.as_ref();
        let template = policy.template();
        Shape {
            effect: p.effect,
            principal: ScopeShape::of(template.principal_constraint().as_inner(), schema),
            action: template.action_constraint(),
            resource: ScopeShape::of(template.resource_constraint().as_inner(), schema),
            body: template.non_scope_constraints().map(ast::ExprShapeOnly::new_from_borrowed),
        }
    }
}

impl<'a> ScopeShape<'a> {
    fn of(c: &'a ast::PrincipalOrResourceConstraint, schema: &Schema) -> ScopeShape<'a> {
        use ast::{EntityReference, PrincipalOrResourceConstraint as C};
        let entity = |r: &'a EntityReference| match r {
            EntityReference::EUID(uid) => Some(EntityShape::of(uid, schema)),
            EntityReference::Slot(_) => None,
        };
        let shape = match c {
            C::Any => Some(ScopeShape::Any),
            C::In(r) => entity(r).map(ScopeShape::In),
            C::Eq(r) => entity(r).map(ScopeShape::Eq),
            C::Is(ty) => Some(ScopeShape::Is(ty)),
            C::IsIn(ty, r) => entity(r).map(|e| ScopeShape::IsIn(ty, e)),
        };
        shape.unwrap_or(ScopeShape::Other(c))
    }
}

impl<'a> EntityShape<'a> {
    fn of(uid: &'a ast::EntityUID, schema: &Schema) -> EntityShape<'a> {
        let ty = uid.entity_type();
        let id: &str = uid.eid().as_ref();
        let standard = !ty.is_action()
            && schema
                .as_ref()
                .get_entity_type(ty)
                .is_some_and(|t| matches!(t.kind, ValidatorEntityTypeKind::Standard(_)));
        let plain = id.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        EntityShape { ty, id: if standard && plain { None } else { Some(id) } }
    }
}

/// Puts a validation result's errors and warnings at their policies' places.
fn report_validation(
    result: &cedar_policy::ValidationResult,
    by_id: &HashMap<&str, &BundlePolicy>,
    sources: &HashMap<&str, &str>,
    errors: &mut Vec<BundleError>,
    warnings: &mut Vec<String>,
) {
    for e in result.validation_errors() {
        let id = e.policy_id().to_string();
        let Some(p) = by_id.get(id.as_str()) else {
            errors.push(BundleError::in_file("policies", e.to_string()));
            continue;
        };
        let src = sources.get(p.file.as_str()).copied().unwrap_or("");
        let message = format!("policy `{id}`: {}", describe(e));
        let at = first_offset(e).filter(|o| *o < src.len());
        errors.push(match at {
            Some(offset) => BundleError::at(&p.file, src, offset, message),
            None => BundleError { file: p.file.clone(), line: Some(p.line), column: Some(p.column), message },
        });
    }
    for w in result.validation_warnings() {
        let id = w.policy_id().to_string();
        match by_id.get(id.as_str()) {
            Some(p) => warnings.push(format!("{}:{}:{}: policy `{id}`: {}", p.file, p.line, p.column, describe(w))),
            None => warnings.push(describe(w)),
        }
    }
}

/// The message of a diagnostic, its help appended, Cedar's "for policy `…`, " prefix removed.
fn describe(d: &dyn Diagnostic) -> String {
    let text = d.to_string();
    let text = match text.strip_prefix("for policy `") {
        Some(rest) => rest.split_once("`, ").map_or(text.as_str(), |(_, m)| m).to_string(),
        None => text.clone(),
    };
    match d.help() {
        Some(help) => format!("{text} ({help})"),
        None => text,
    }
}

fn first_offset(d: &dyn Diagnostic) -> Option<usize> {
    d.labels().and_then(|mut labels| labels.next()).map(|l| l.offset())
}

fn diagnostic_errors(file: &str, src: &str, d: &dyn Diagnostic) -> Vec<BundleError> {
    let message = describe(d);
    vec![match first_offset(d).filter(|o| *o <= src.len()) {
        Some(offset) => BundleError::at(file, src, offset, message),
        None => BundleError::in_file(file, message),
    }]
}

/// A position in a file that only moves forward.
#[derive(Debug, Default)]
struct Position {
    offset: usize,
    line: usize,
    line_start: usize,
}

impl Position {
    /// The 1-based line and column of `offset` (not before the last one asked for).
    fn advance(&mut self, src: &str, offset: usize) -> (usize, usize) {
        let offset = offset.clamp(self.offset, src.len());
        let between = &src.as_bytes()[self.offset..offset];
        self.line += between.iter().filter(|b| **b == b'\n').count();
        if let Some(last) = between.iter().rposition(|b| *b == b'\n') {
            self.line_start = self.offset + last + 1;
        }
        self.offset = offset;
        let column = src.get(self.line_start..offset).map_or(0, |l| l.chars().count());
        (self.line + 1, column + 1)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_column(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_runs_cover_every_item_once_in_order() {
        let items: Vec<usize> = (0..37).collect();
        for chunks in 0..12 {
            let runs = in_parallel(&items, chunks, |i| 1 + i % 5, <[usize]>::to_vec);
            assert!(!runs.is_empty() && runs.len() <= chunks.max(1), "{chunks} chunks: {} runs", runs.len());
            assert!(runs.iter().all(|r| !r.is_empty()), "{chunks} chunks: an empty run");
            assert_eq!(runs.concat(), items, "{chunks} chunks");
        }
        assert_eq!(in_parallel(&[] as &[usize], 4, |_| 1, <[usize]>::len), [0]);
        // A heavy last item closes a run by itself: no empty run follows it.
        let runs = in_parallel(&[1usize, 1, 100], 3, |w| *w, <[usize]>::to_vec);
        assert!(runs.iter().all(|r| !r.is_empty()), "{runs:?}");
        assert_eq!(runs.concat(), [1, 1, 100]);
    }

    #[test]
    fn validation_in_runs_reports_what_one_run_does() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
        let schema_src = std::fs::read_to_string(dir.join(SCHEMA_FILE)).unwrap();
        let (schema, _) = Schema::from_cedarschema_str(&schema_src).unwrap();
        let mut src = std::fs::read_to_string(dir.join("baseline.cedar")).unwrap();
        for i in 0..6 {
            // Every other one names an attribute the schema does not have.
            let attr = if i % 2 == 0 { "sensitivity" } else { "no_such_attribute" };
            src.push_str(&format!(
                "@id(\"extra-{i}\") forbid (principal, action, resource) when {{ resource.{attr} == \"x\" }};\n"
            ));
        }
        let policies = parse_policies("p.cedar", &src).unwrap();
        let sources = HashMap::from([("p.cedar", src.as_str())]);
        let report = |runs: usize| {
            let (mut errors, mut warnings) = (Vec::new(), Vec::new());
            validate_in_runs(runs, &schema, &policies, &sources, &mut errors, &mut warnings);
            let mut errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            errors.sort();
            warnings.sort();
            (errors, warnings)
        };
        let one = report(1);
        assert_eq!(one.0.len(), 3, "{:?}", one.0);
        assert!(one.0.iter().all(|e| e.contains("no_such_attribute")), "{:?}", one.0);
        for runs in [2, 3, 8] {
            assert_eq!(report(runs), one, "{runs} runs");
        }
    }

    /// Validating one policy of each shape finds what validating every policy finds: the
    /// same errors and warnings, for the same policies, with the same messages.
    mod shapes {
        use super::*;
        use proptest::prelude::*;

        fn schema() -> Schema {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
            let src = std::fs::read_to_string(dir.join(SCHEMA_FILE)).unwrap();
            // Resources in an enumerated type, so that a scope can name one of its values.
            let mut src = src.replace("entity Resource {", "entity Resource in [Tier] {");
            src.push_str("\nentity Tier enum [\"gold\", \"silver\"];\n");
            Schema::from_cedarschema_str(&src).unwrap().0
        }

        /// Entity ids alike and not: printable ASCII, a tab, a space, mixed scripts (a
        /// Cyrillic `а`), a bidirectional control, a letter outside ASCII.
        const IDS: &[&str] = &["a", "ag-1", "a b", "a\\tb", "p\u{0430}ypal", "x\\u{202E}y", "\u{e4}"];
        const ACTIONS: &[&str] = &["request_token", "call_api", "no_such_action"];
        const TIERS: &[&str] = &["gold", "silver", "bronze"];

        /// A policy's form, with holes for the ids: `{i}` and `{j}` (entities), `{a}` (an
        /// action), `{t}` (a tier, an enumerated type).
        fn form() -> impl Strategy<Value = String> {
            let principal = prop::sample::select(vec![
                "principal",
                "principal == Agent::\"{i}\"",
                "principal in Blueprint::\"{i}\"",
                "principal is Agent in Sponsor::\"{i}\"",
                "principal == Action::\"{a}\"",
                "principal == NoSuchType::\"{i}\"",
            ]);
            let action = prop::sample::select(vec![
                "action",
                "action == Action::\"{a}\"",
                "action in [Action::\"call_api\", Action::\"request_token\"]",
            ]);
            let resource = prop::sample::select(vec![
                "resource",
                "resource == Resource::\"{j}\"",
                "resource in Tier::\"{t}\"",
                "resource == User::\"{j}\"",
            ]);
            let body = prop::sample::select(vec![
                "",
                "when { context.agent_risk == \"high\" }",
                "when { principal.no_such_attribute == 1 }",
                "when { Agent::\"{i}\" == Agent::\"{j}\" }",
                "unless { principal in Blueprint::\"{j}\" }",
                "when { Tier::\"{t}\" == Tier::\"gold\" }",
                "when { resource.sensitivity == \"{j}\" }",
            ]);
            (prop::bool::ANY, principal, action, resource, body).prop_map(|(permit, p, a, r, b)| {
                format!("{} ({p}, {a}, {r}) {b};", if permit { "permit" } else { "forbid" })
            })
        }

        /// A few forms, and policies that fill them in: many policies share a form, and many
        /// of those a shape.
        fn bundle() -> impl Strategy<Value = String> {
            let fill = (
                any::<prop::sample::Index>(),
                prop::sample::select(IDS),
                prop::sample::select(IDS),
                prop::sample::select(ACTIONS),
                prop::sample::select(TIERS),
            );
            (prop::collection::vec(form(), 1..5), prop::collection::vec(fill, 1..40)).prop_map(|(forms, fills)| {
                fills
                    .iter()
                    .enumerate()
                    .map(|(n, (at, i, j, a, t))| {
                        let form = at.get(&forms);
                        let body = form.replace("{i}", i).replace("{j}", j).replace("{a}", a).replace("{t}", t);
                        format!("@id(\"p{n}\")\n{body}\n")
                    })
                    .collect()
            })
        }

        fn findings(results: &[cedar_policy::ValidationResult]) -> (Vec<String>, Vec<String>) {
            let mut errors: Vec<String> =
                results.iter().flat_map(|r| r.validation_errors().map(|e| format!("{e:?}"))).collect();
            let mut warnings: Vec<String> =
                results.iter().flat_map(|r| r.validation_warnings().map(|w| format!("{w:?}"))).collect();
            errors.sort();
            warnings.sort();
            (errors, warnings)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
            #[test]
            fn one_policy_of_each_shape_finds_what_every_policy_does(src in bundle()) {
                let policies = parse_policies("p.cedar", &src).unwrap();
                let schema = schema();
                let mut every = PolicySet::new();
                for p in &policies {
                    every.add(p.policy.clone()).unwrap();
                }
                let plain = findings(&[Validator::new(schema.clone()).validate(&every, ValidationMode::Strict)]);
                let shaped = findings(&validate_by_shape(&schema, &policies));
                prop_assert_eq!(shaped, plain, "{}", src);
            }
        }

        #[test]
        fn policies_that_differ_in_a_scope_id_share_a_shape_unless_the_id_is_read() {
            let src = r#"
                @id("a") permit (principal == Agent::"ag-1", action, resource == Resource::"r1");
                @id("b") permit (principal == Agent::"ag-2", action, resource == Resource::"r2");
                @id("c") permit (principal == Agent::"ag-2", action, resource == Resource::"r2") when { true };
                @id("d") permit (principal == Action::"call_api", action, resource);
                @id("e") permit (principal == Action::"no_such_action", action, resource);
                @id("f") permit (principal in Tier::"gold", action, resource);
                @id("g") permit (principal in Tier::"bronze", action, resource);
                @id("h") permit (principal == Agent::"p\u{0430}ypal", action, resource == Resource::"r1");
            "#;
            let policies = parse_policies("p.cedar", src).unwrap();
            let schema = schema();
            let shape = |id: &str| Shape::of(policies.iter().find(|p| &*p.id == id).unwrap(), &schema);
            assert!(shape("a") == shape("b"));
            assert!(shape("b") != shape("c"), "the condition is part of the shape");
            assert!(shape("d") != shape("e"), "an action's id is read");
            assert!(shape("f") != shape("g"), "an enumerated entity's id is read");
            assert!(shape("a") != shape("h"), "an id outside printable ASCII is looked at");
        }
    }

    #[test]
    fn line_column_counts_from_one() {
        let src = "ab\ncdé\nf";
        assert_eq!(line_column(src, 0), (1, 1));
        assert_eq!(line_column(src, 3), (2, 1));
        assert_eq!(line_column(src, 8), (3, 1));
        assert_eq!(line_column(src, 100), (3, 2));
    }

    #[test]
    fn locations_parse_and_match() {
        let locs =
            Locations::from_json_str(r#"{"corp": ["10.0.0.0/8", "2001:db8::/32"], "home": ["192.0.2.7"]}"#).unwrap();
        let names = |ip: &str| locs.containing(ip.parse().unwrap()).map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(names("10.9.9.9"), ["corp"]);
        assert_eq!(names("2001:db8::1"), ["corp"]);
        assert_eq!(names("192.0.2.7"), ["home"]);
        assert!(names("192.0.2.8").is_empty());
    }

    #[test]
    fn bad_locations_name_the_location() {
        let err = Locations::from_json_str(r#"{"corp": ["10.0.0.0/33", 7]}"#).unwrap_err();
        let err: Vec<String> = err.iter().map(ToString::to_string).collect();
        assert_eq!(err.len(), 2);
        assert!(err[0].starts_with("location `corp`: `10.0.0.0/33` is not a network"), "{}", err[0]);
        assert!(err[1].starts_with("location `corp`: expected a string"), "{}", err[1]);
        let err = Locations::from_json_str(r#"{"corp": ["10.0.0.0/8\u001b[2J"]}"#).unwrap_err();
        assert!(err[0].to_string().contains("`10.0.0.0/8\\u{1b}[2J` is not a network"), "{}", err[0]);
    }

    #[test]
    fn policies_take_their_ids_and_positions() {
        let src = "// c\n@id(\"a\")\npermit(principal, action, resource);\n\n@id(\"b\") @state(\"report-only\") @reason(\"r\")\nforbid(principal, action, resource);\n";
        let ps = parse_policies("f.cedar", src).unwrap();
        let got: Vec<_> =
            ps.iter().map(|p| (p.id.to_string(), p.state, p.line, p.column, p.reason.to_string())).collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), PolicyState::On, 2, 1, "".into()),
                ("b".into(), PolicyState::ReportOnly, 5, 1, "r".into())
            ]
        );
    }

    #[test]
    fn positions_are_where_the_parser_saw_each_policy() {
        // The first policy's text is also in a comment above it: a search for the text would
        // find the comment.
        let src = "// @id(\"a\") permit(principal, action, resource);\n@id(\"a\") permit(principal, action, resource);\n\t@id(\"b\") permit(principal, action, resource);";
        let ps = parse_policies("f.cedar", src).unwrap();
        let got: Vec<_> = ps.iter().map(|p| (p.id.to_string(), p.line, p.column)).collect();
        assert_eq!(got, vec![("a".into(), 2, 1), ("b".into(), 3, 2)]);
        let src = "@id(\"a\") permit(principal, action, resource);\n  @id(\"t\") permit(principal == ?principal, action, resource);";
        let errs: Vec<String> = parse_policies("f.cedar", src).unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(errs, ["f.cedar:2:3: templates (policies with ?principal or ?resource) are not supported"]);
    }

    #[test]
    fn missing_id_and_bad_state_are_located() {
        let src = "@id(\"a\")\npermit(principal, action, resource);\n  permit(principal, action, resource);\n@id(\"c\") @state(\"maybe\") forbid(principal, action, resource);";
        let errs: Vec<String> = parse_policies("f.cedar", src).unwrap_err().iter().map(ToString::to_string).collect();
        assert_eq!(
            errs,
            vec![
                "f.cedar:3:3: policy has no @id annotation: every policy needs a stable @id(\"…\")",
                "f.cedar:4:1: policy `c`: unknown @state `maybe`: expected one of on, off, report-only",
            ]
        );
    }

    #[test]
    fn parse_errors_are_located() {
        let errs =
            parse_policies("f.cedar", "@id(\"a\")\npermit(principal, action, resource)\nwhen { principal.x == };")
                .unwrap_err();
        assert_eq!((errs[0].line, errs[0].column), (Some(3), Some(23)), "{}", errs[0]);
    }

    /// A copy of the sample bundle (its files, not its tests) that a test may break.
    fn sample() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for entry in fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
            }
        }
        dir
    }

    fn errors_of(dir: &Path) -> Vec<String> {
        Bundle::load(dir).unwrap_err().0.iter().map(ToString::to_string).collect()
    }

    fn one_error(dir: &Path, file: &str) -> String {
        let errors = errors_of(dir);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let prefix = format!("{}:", dir.join(file).display());
        assert!(errors[0].starts_with(&prefix), "{} does not name {file}", errors[0]);
        errors[0][prefix.len()..].trim().to_string()
    }

    #[test]
    fn policy_entries_that_cannot_be_read_are_errors() {
        use std::os::unix::fs::symlink;
        let dir = sample();
        let p = dir.path();
        Bundle::load(p).unwrap();
        symlink("nowhere.cedar", p.join("dangling.cedar")).unwrap();
        assert_eq!(
            one_error(p, "dangling.cedar"),
            "cannot read: it is a link to `nowhere.cedar`, which does not exist"
        );
        fs::remove_file(p.join("dangling.cedar")).unwrap();
        symlink("loop.cedar", p.join("loop.cedar")).unwrap();
        assert!(one_error(p, "loop.cedar").starts_with("cannot read: "));
        fs::remove_file(p.join("loop.cedar")).unwrap();
        fs::create_dir(p.join("folder.cedar")).unwrap();
        assert_eq!(one_error(p, "folder.cedar"), "cannot read: not a regular file");
        fs::remove_dir(p.join("folder.cedar")).unwrap();
        // A FIFO would block a reader until someone writes to it: it is refused unopened.
        let status = std::process::Command::new("mkfifo").arg(p.join("fifo.cedar")).status().unwrap();
        assert!(status.success());
        assert_eq!(one_error(p, "fifo.cedar"), "cannot read: not a regular file");
        fs::remove_file(p.join("fifo.cedar")).unwrap();
        // Hidden entries are not policy files: an editor's swap file, a ConfigMap's `..data`.
        symlink("nowhere", p.join(".hidden.cedar")).unwrap();
        fs::create_dir(p.join("..2026_11_27")).unwrap();
        symlink("..2026_11_27", p.join("..data")).unwrap();
        Bundle::load(p).unwrap();
    }

    #[test]
    fn bundle_files_that_cannot_be_read_are_errors() {
        use std::os::unix::fs::symlink;
        let dir = sample();
        let p = dir.path();
        fs::rename(p.join(DIRECTORY_FILE), p.join("real.json")).unwrap();
        // Read forever, it would never end: a device is not a regular file.
        symlink("/dev/zero", p.join(DIRECTORY_FILE)).unwrap();
        assert_eq!(one_error(p, DIRECTORY_FILE), "cannot read: not a regular file");
        fs::remove_file(p.join(DIRECTORY_FILE)).unwrap();
        fs::rename(p.join("real.json"), p.join(DIRECTORY_FILE)).unwrap();

        // locations.json may be absent, but a link to nowhere is not absence.
        fs::remove_file(p.join(LOCATIONS_FILE)).unwrap();
        assert!(Bundle::load(p).unwrap().locations.is_empty());
        symlink("gone.json", p.join(LOCATIONS_FILE)).unwrap();
        assert_eq!(one_error(p, LOCATIONS_FILE), "cannot read: it is a link to `gone.json`, which does not exist");
        fs::remove_file(p.join(LOCATIONS_FILE)).unwrap();

        fs::remove_file(p.join(SCHEMA_FILE)).unwrap();
        fs::create_dir(p.join(SCHEMA_FILE)).unwrap();
        assert_eq!(one_error(p, SCHEMA_FILE), "cannot read: not a regular file");
    }

    #[test]
    fn bundle_files_are_capped() {
        let dir = sample();
        let p = dir.path();
        // Sparse: the size is refused before a byte is read.
        let huge = fs::File::create(p.join("huge.cedar")).unwrap();
        huge.set_len(input::MAX_POLICY_FILE_BYTES + 1).unwrap();
        assert_eq!(
            one_error(p, "huge.cedar"),
            format!("is larger than the limit of {} bytes", input::MAX_POLICY_FILE_BYTES)
        );
        fs::remove_file(p.join("huge.cedar")).unwrap();
        let schema = fs::OpenOptions::new().append(true).open(p.join(SCHEMA_FILE)).unwrap();
        schema.set_len(input::MAX_SCHEMA_BYTES + 1).unwrap();
        assert_eq!(one_error(p, SCHEMA_FILE), format!("is larger than the limit of {} bytes", input::MAX_SCHEMA_BYTES));
    }

    #[test]
    fn duplicate_json_keys_are_errors() {
        let err = Locations::from_json_str(r#"{"corp": ["10.0.0.0/8"], "corp": ["0.0.0.0/0"]}"#).unwrap_err();
        let err = err[0].to_string();
        assert!(err.starts_with("1:") && err.contains("duplicate key `corp`"), "{err:?}");
        let dir = sample();
        let path = dir.path().join(DIRECTORY_FILE);
        let src = fs::read_to_string(&path).unwrap();
        let (head, tail) = src.split_once("\"id\"").unwrap();
        fs::write(&path, format!("{head}\"enabled\": false, \"enabled\": true, \"id\"{tail}")).unwrap();
        let message = one_error(dir.path(), DIRECTORY_FILE);
        assert!(message.contains("duplicate key `enabled`"), "{message}");
    }

    const DEEP_POLICY: &str = "@id(\"deep\")\nforbid (principal, action, resource)\nwhen { ";

    #[test]
    fn deep_policies_are_errors_not_crashes() {
        let dir = sample();
        let p = dir.path();
        let shapes = [
            format!("{}true{}", "(".repeat(100_000), ")".repeat(100_000)),
            format!("{}true", "if true then false else ".repeat(5_000)),
            format!("{}{} == []", "[".repeat(50_000), "]".repeat(50_000)),
            format!("{} == 1", vec!["1"; 100_000].join(" + ")),
            format!("{}true", "!".repeat(100_000)),
            format!("{}true{}", "!(".repeat(50_000), ")".repeat(50_000)),
            format!("context{} == 1", ".a".repeat(100_000)),
        ];
        for shape in shapes {
            fs::write(p.join("deep.cedar"), format!("{DEEP_POLICY}{shape} }};\n")).unwrap();
            let message = one_error(p, "deep.cedar");
            assert!(message.starts_with("3:"), "{message}");
            assert!(message.contains(": nested too deeply: expressions may nest at most 256 levels"), "{message}");
        }
        // So many conditions nest too: Cedar joins them with `&&`.
        let whens = format!("@id(\"deep\")\nforbid (principal, action, resource){};", " when { true }".repeat(10_000));
        fs::write(p.join("deep.cedar"), whens).unwrap();
        assert!(one_error(p, "deep.cedar").contains("nested too deeply"));
    }

    #[test]
    fn policies_at_the_limit_load_and_index() {
        // The deepest a parenthesised condition may be: Cedar's parser needs far more than a
        // default thread's stack for it in a debug build.
        let dir = sample();
        let depth = nesting::MAX_NESTING - 3;
        let src = format!("{DEEP_POLICY}{}true{} }};\n", "(".repeat(depth), ")".repeat(depth));
        assert_eq!(nesting::policy_depth(&src), nesting::MAX_NESTING);
        fs::write(dir.path().join("deep.cedar"), src).unwrap();
        let bundle = Bundle::load(dir.path()).unwrap();
        // Built and dropped on a thread with the stack of a tokio worker.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || drop(crate::snapshot::Snapshot::from_bundle(bundle).unwrap()))
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn deep_schemas_are_errors_not_crashes() {
        let dir = sample();
        let p = dir.path();
        let schema = fs::read_to_string(p.join(SCHEMA_FILE)).unwrap();
        let lines = schema.lines().count();
        let deep_set = format!("type Deep = {}String{};\n", "Set<".repeat(50_000), ">".repeat(50_000));
        let deep_record = format!("type Deep = {}String{};\n", "{a: ".repeat(50_000), "}".repeat(50_000));
        // The column of the 257th bracket: `Set<` and `{a: ` are four characters each.
        for (deep, column) in [(deep_set, 13 + 4 * 256 + 3), (deep_record, 13 + 4 * 256)] {
            fs::write(p.join(SCHEMA_FILE), format!("{schema}{deep}")).unwrap();
            let message = one_error(p, SCHEMA_FILE);
            assert_eq!(
                message,
                format!(
                    "{}:{column}: nested too deeply: types may nest at most 256 levels (each bracket counts)",
                    lines + 1
                )
            );
        }
        let chain: String = (0..300).map(|i| format!("type T{i} = Set<T{}>;\n", i + 1)).collect();
        fs::write(p.join(SCHEMA_FILE), format!("{schema}{chain}type T300 = Long;\n")).unwrap();
        assert_eq!(
            one_error(p, SCHEMA_FILE),
            format!(
                "{}:6: common type `T0` is nested too deeply: with the common types it uses, more than 256 levels",
                lines + 1
            )
        );
        let entities: String = (0..2_000).map(|i| format!("entity E{i} in [E{}];\n", i + 1)).collect();
        fs::write(p.join(SCHEMA_FILE), format!("{schema}{entities}entity E2000;\n")).unwrap();
        assert_eq!(one_error(p, SCHEMA_FILE), "too many entity types: 2006 (at most 1000)");
    }
}
