//! agentca: Conditional Access for AI agents. Before a token issuer mints a token for an
//! agent (or a gateway forwards its call), agentca decides with Cedar policies keyed to the
//! agent, its blueprint and its sponsor, and says why.
//!
//! # Layout
//!
//! Modules depend only on those above them in this list.
//!
//! - [`input`]: reading outside input safely: capped regular files, JSON without duplicate keys
//! - [`nesting`]: how deeply Cedar text may nest, checked before Cedar parses it
//! - [`cedar`]: the one module below cedar-policy's facade: policy positions, compiled
//!   conditions and their evaluator, contexts and entities built as values
//! - [`directory`]: agents, blueprints, sponsors, users, resources, and their Cedar entities
//! - [`bundle`]: reads a `policies/` folder: schema, policies, directory, locations, revision
//! - [`request`]: the raw request, its validation, and the typed request (an `Ask`: a token or
//!   an API call, each with its own fields, defaults filled once)
//! - [`index`]: policy slices keyed by principal scope, action and resource
//! - [`signals`]: live state (disabled agents, risk) layered over the directory: the `Change` a
//!   signal makes, the journal, and the overlay, which a server changes only through the journal
//! - [`live`]: the journal of live directory changes (fsynced before they apply, replayed at start)
//! - [`snapshot`]: one revision, asked rather than reached into (an agent, a resource, counts,
//!   the Cedar request, slice evaluation), and the `arc-swap` store that reloads it
//! - [`watch`]: reloads the bundle when its folder changes (notify, debounced)
//! - [`engine`]: `evaluate(&Snapshot, &Overlay, &Request) -> Decision`, and `explain`
//! - [`records`]: what the service writes to the audit log: decision, signal, reload and
//!   refused-call records
//! - [`audit`]: the hash-chained log of record bodies (it uses no other module): writer, `verify`
//! - [`metrics`]: the metric names and their recording (atomic counters, no labels built per
//!   call), the Prometheus text, and `listener`: `/metrics`, `/healthz`, `/readyz` over HTTP
//! - [`service`]: the running service: decide + audit, signals, reloads (no transport)
//! - [`tls`]: the rustls server configuration, reloaded when its files change, and the caller's
//!   identity from its certificate
//! - [`access`]: who may ask what (`--access`): identities and token hashes to roles, refusals
//!   counted
//! - [`grpc`]: tonic services (decision, admin, Envoy ext_authz); proto conversion lives here
//! - [`cli`]: the `agentca` command line, one file per command; one error type and reporter
//!
//! Tools beside the product, compiled only with the `tools` feature (`cargo build --features
//! tools`), so the server's binary carries none of them:
//!
//! - `generate`: writes large synthetic bundles, deterministic from a seed (the scale bench)
//! - `grpc::load`: a load generator for `Evaluate`, and a no-op DecisionService as its baseline
//! - their commands: `agentca generate`, `agentca loadgen`, `agentca noop-serve`
//!
//! And for fuzzing, with the `fuzzing` feature (and in the tests): `fuzz`, one entry point per
//! decoder of outside input, which the cargo-fuzz targets in `fuzz/` call.

pub mod access;
pub mod audit;
pub mod bundle;
pub mod cedar;
pub mod cli;
pub mod directory;
pub mod engine;
pub mod fleet;
// Fuzzing entry points: built for `fuzz/` (the `fuzzing` feature) and for the tests.
#[cfg(any(feature = "fuzzing", test))]
pub mod fuzz;
// A tool, not the product; its own unit tests run in every `cargo test`.
#[cfg(any(feature = "tools", test))]
pub mod generate;
pub mod grpc;
pub mod index;
pub mod input;
pub mod live;
pub mod metrics;
pub mod nesting;
pub mod records;
pub mod request;
pub mod service;
pub mod signals;
pub mod snapshot;
pub mod tls;
pub mod watch;

/// How the maps a decision looks up hash their keys (the directory's, the index's and its
/// memo's, the live overlay's): foldhash, randomly seeded per map as std's SipHash is, and
/// several times faster on short keys. It resists deliberately colliding keys less than SipHash;
/// the keys these maps hold come from the bundle, the directory's changes and admins' signals,
/// and the memo's are serials, none from a decision's request (which only looks keys up).
pub(crate) type HashState = foldhash::fast::RandomState;
