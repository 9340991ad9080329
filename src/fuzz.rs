//! Entry points for fuzzing every decoder of outside input. Each takes arbitrary bytes and
//! must return, whatever they hold: no panic, no abort, no unbounded work. `fuzz/` runs them
//! under libFuzzer (`cargo fuzz run TARGET -s none`); the tests below replay the seeds in
//! `fuzz/corpus/` and mutations of them on every `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chrono::{TimeDelta, Utc};
use prost::Message;

use crate::bundle::Locations;
use crate::directory::{Directory, EntityTypes};
use crate::engine::evaluate;
use crate::grpc::pb;
use crate::request::RawRequest;
use crate::signals::{Journal, Overlay};
use crate::snapshot::Snapshot;

/// A fuzz target: takes any bytes.
pub type Target = fn(&[u8]);

/// The targets, by the names `fuzz/fuzz_targets/` and `fuzz/corpus/` use.
pub const TARGETS: [(&str, Target); 11] = [
    ("request_json", request_json),
    ("request_proto", request_proto),
    ("envoy_check", envoy_check),
    ("directory_json", directory_json),
    ("locations_json", locations_json),
    ("policy_file", policy_file),
    ("schema_file", schema_file),
    ("journal_replay", journal_replay),
    ("audit_verify", audit_verify),
    ("access_file", access_file),
    ("certificate", certificate),
];

fn sample_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"))
}

/// The sample bundle, loaded once: decoded requests are decided against it. None if it does
/// not load (its own tests say why), and then nothing is decided.
fn sample() -> Option<&'static Snapshot> {
    static SAMPLE: OnceLock<Option<Snapshot>> = OnceLock::new();
    SAMPLE.get_or_init(|| Snapshot::load(sample_dir()).ok()).as_ref()
}

fn sample_schema() -> &'static str {
    static SCHEMA: OnceLock<String> = OnceLock::new();
    SCHEMA.get_or_init(|| std::fs::read_to_string(sample_dir().join("schema.cedarschema")).unwrap_or_default())
}

/// Validates a raw request as the service does and, if valid, decides it and builds its audit
/// record.
fn decide(raw: RawRequest) {
    let now = Utc::now();
    // As served (a bound on clock skew), then as `eval` reads it (any time).
    let _ = raw.clone().validate_with(now, Some(TimeDelta::minutes(5)));
    let (Ok(request), Some(snap)) = (raw.validate(now), sample()) else { return };
    let decision = evaluate(snap, &Overlay::new(), &request);
    let caller =
        crate::records::Caller { peer: None, identity: None, subject: None, token: None, via: "cli", replica: None };
    let record = crate::records::DecisionRecord::new(snap, &request, &decision, &caller);
    let _ = crate::records::body(&record);
}

/// A request as `eval --request` reads it (JSON), validated and decided.
pub fn request_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(value) = crate::input::parse_json(text) else { return };
    if let Ok(raw) = RawRequest::from_json(&value) {
        decide(raw);
    }
}

/// A DecisionService `Evaluate` message: decoded, converted, validated and decided.
pub fn request_proto(data: &[u8]) {
    if let Ok(message) = pb::EvaluateRequest::decode(data) {
        decide(RawRequest::from(message));
    }
}

/// An Envoy `CheckRequest`: decoded, its attributes turned into a request (the host resolved
/// against the sample's audiences), validated and decided.
pub fn envoy_check(data: &[u8]) {
    let Ok(check) = envoy_types::ext_authz::v3::pb::CheckRequest::decode(data) else { return };
    let (mut raw, host) = crate::grpc::envoy::raw_request(&check);
    if raw.resource.as_deref().is_none_or(str::is_empty)
        && let (Some(host), Some(snap)) = (host, sample())
    {
        raw.resource = Some(crate::grpc::envoy::resolve_host(snap, &host));
    }
    decide(raw);
}

/// `directory.json`: read, and if it reads, checked against the sample schema and exported;
/// the same text as a live change, applied over what it read.
pub fn directory_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    static SCHEMA: OnceLock<Option<cedar_policy::Schema>> = OnceLock::new();
    let schema = SCHEMA.get_or_init(|| cedar_policy::Schema::from_cedarschema_str(sample_schema()).ok().map(|s| s.0));
    if let (Ok(directory), Some(schema)) = (Directory::from_json_str(text), schema) {
        let _ = directory.check_schema(schema, EntityTypes::get());
        let _ = directory.to_json();
        if let Ok(change) = crate::directory::Change::from_json_str(text) {
            let _ = directory.apply(&change);
        }
    }
}

/// `locations.json`; a location list that reads is asked about a few addresses.
pub fn locations_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(locations) = Locations::from_json_str(text) {
        let addresses = [std::net::Ipv4Addr::new(10, 1, 2, 3).into(), std::net::Ipv6Addr::LOCALHOST.into()];
        for ip in addresses {
            let _ = locations.containing(ip).count();
        }
    }
}

/// A `.cedar` file, parsed and validated against the sample schema.
pub fn policy_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::bundle::check_policy_text(sample_schema(), "fuzz.cedar", text);
}

/// A schema, with a policy that uses its every kind of type.
pub fn schema_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::bundle::check_policy_text(text, "p.cedar", "@id(\"p\") permit(principal, action, resource);");
}

/// A scratch folder of this process and thread, for the decoders that read files.
fn scratch() -> PathBuf {
    thread_local! {
        static DIR: PathBuf = {
            let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
            let dir = std::env::temp_dir().join(format!("agentca-fuzz-{}-{thread}", std::process::id()));
            let _ = std::fs::create_dir_all(&dir);
            dir
        };
    }
    DIR.with(PathBuf::clone)
}

/// The signal journal (`signals.jsonl`), replayed at start.
pub fn journal_replay(data: &[u8]) {
    let dir = scratch();
    let path = dir.join(crate::signals::JOURNAL_FILE);
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let overlay = Overlay::new();
    if Journal::open(&dir, &overlay).is_ok() {
        // What replayed is listed as ListSignals would.
        let _ = overlay.page(None, 500);
    }
    let _ = std::fs::remove_file(&path);
}

/// An audit log checked by `agentca audit verify`.
pub fn audit_verify(data: &[u8]) {
    let path = scratch().join("decisions.jsonl");
    if std::fs::write(&path, data).is_ok() {
        let _ = crate::audit::verify(std::slice::from_ref(&path));
    }
    let _ = std::fs::remove_file(&path);
}

/// An access file (`--access`), as TOML and as JSON; one that reads is asked about a caller
/// with the first line of the input as its identity and bearer token.
pub fn access_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let probe = text.lines().next().unwrap_or_default();
    for name in ["access.toml", "access.json"] {
        if let Ok(access) = crate::access::Access::parse(Path::new(name), text) {
            let bearer = format!("Bearer {probe}");
            for need in [None, Some(crate::access::Role::Decide), Some(crate::access::Role::Admin)] {
                let _ = access.check(Some(probe), Some(bearer.as_bytes()), need);
                let _ = access.check(None, Some(probe.as_bytes()), need);
            }
        }
    }
}

/// A client certificate (DER), as the TLS layer reads the caller's identity from it.
pub fn certificate(data: &[u8]) {
    let _ = crate::tls::identity(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds of `fuzz/corpus/TARGET`, and what the fuzzer found there.
    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
        files.sort();
        files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
    }

    /// A small, deterministic mutator (xorshift): flips, inserts, deletes and repeats bytes.
    struct Mutator(u64);

    impl Mutator {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
            let mut out = seed.to_vec();
            for _ in 0..1 + self.below(4) {
                let at = self.below(out.len() + 1);
                match self.below(5) {
                    0 if at < out.len() => out[at] ^= 1 << self.below(8),
                    1 => out.insert(at, b"{}[]\",:\\0123456789-.eE \n\x00\xff"[self.below(25)]),
                    2 if at < out.len() => {
                        out.remove(at);
                    }
                    3 => {
                        let end = (at + self.below(16)).min(out.len());
                        let piece = out[at..end].to_vec();
                        out.splice(at..at, piece.iter().copied().cycle().take(piece.len() * self.below(8)));
                    }
                    _ if at < out.len() => out[at] = self.next() as u8,
                    _ => {}
                }
            }
            out
        }
    }

    /// The binary seeds, encoded from messages here: `AGENTCA_BLESS=1 cargo test fuzz` writes
    /// them; otherwise they must match.
    fn binary_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
        use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
        use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
        let token = pb::EvaluateRequest {
            agent: "ag-mail-01".into(),
            resource: "graph".into(),
            scopes: vec!["Mail.Read".into()],
            client_ip: "10.1.2.3".into(),
            time: "2026-11-25T10:00:00Z".into(),
            request_id: "r-1".into(),
            ..Default::default()
        };
        let call = pb::EvaluateRequest {
            agent: "ag-mail-02".into(),
            resource: "graph".into(),
            action: "call_api".into(),
            method: "GET".into(),
            path: "/v1.0/me".into(),
            signin_risk: "low".into(),
            ..Default::default()
        };
        let check = |host: &str, extensions: &[(&str, &str)]| {
            let headers = [("x-agent-id", "ag-mail-01"), ("x-request-id", "envoy-1")];
            envoy_types::ext_authz::v3::pb::CheckRequest {
                attributes: Some(AttributeContext {
                    source: Some(attribute_context::Peer {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: "10.1.2.3".into(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(40000)),
                                ..Default::default()
                            })),
                        }),
                        principal: "spiffe://corp.example/ns/agents/ag-mail-01".into(),
                        ..Default::default()
                    }),
                    request: Some(attribute_context::Request {
                        http: Some(attribute_context::HttpRequest {
                            method: "GET".into(),
                            path: "/v1.0/me/messages?top=5".into(),
                            host: host.into(),
                            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    context_extensions: extensions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                    ..Default::default()
                }),
            }
            .encode_to_vec()
        };
        vec![
            ("request_proto", "token.bin", token.encode_to_vec()),
            ("request_proto", "call.bin", call.encode_to_vec()),
            ("envoy_check", "host.bin", check("graph.microsoft.com:443", &[])),
            ("envoy_check", "extensions.bin", check("", &[("resource", "ledger"), ("agent", "ag-recon-01")])),
        ]
    }

    #[test]
    fn binary_seeds_are_current() {
        // Maps encode in hash order: the seeds are compared as messages, not bytes.
        fn same<M: Message + Default + PartialEq>(a: &[u8], b: &[u8]) -> bool {
            matches!((M::decode(a), M::decode(b)), (Ok(a), Ok(b)) if a == b)
        }
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (target, name, bytes) in binary_seeds() {
            let path = corpus.join(target).join(name);
            if std::env::var_os("AGENTCA_BLESS").is_some() {
                std::fs::write(&path, &bytes).unwrap();
            }
            let file = std::fs::read(&path).unwrap_or_default();
            let current = match target {
                "envoy_check" => same::<envoy_types::ext_authz::v3::pb::CheckRequest>(&file, &bytes),
                _ => same::<pb::EvaluateRequest>(&file, &bytes),
            };
            assert!(current, "{} is not current (AGENTCA_BLESS=1 rewrites it)", path.display());
        }
    }

    #[test]
    fn every_target_has_seeds_and_survives_them_and_their_mutations() {
        let mut mutator = Mutator(0x9e37_79b9_7f4a_7c15);
        for (name, target) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "fuzz/corpus/{name} has no seeds");
            for seed in &seeds {
                target(seed);
            }
            for i in 0..300 {
                target(&mutator.mutate(&seeds[i % seeds.len()]));
            }
        }
        // This thread's scratch folder goes with the test.
        let _ = std::fs::remove_dir_all(scratch());
    }
}
